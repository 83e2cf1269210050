#!/usr/bin/env bash
# The deployment's secrets, made once on first use and never committed (secrets/ is in .gitignore):
# secrets/postgres.env holds a random PostgreSQL password and the CONVERGE_DATABASE_URL that uses it,
# read by every service of docker-compose.yml besides converge.env. An existing file is kept as it is,
# so running this again (`make secrets`) never changes a password a database was created with.
#   usage: scripts/make-secrets.sh [FILE]     (default: secrets/postgres.env next to docker-compose.yml)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-secrets/postgres.env}"
if [ -s "$out" ]; then
    echo "secrets: $out exists, kept"
    exit 0
fi
mkdir -p "$(dirname "$out")"
umask 077
password="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"   # 64 hex digits: safe in a URL
user="$(sed -n 's/^POSTGRES_USER=//p' converge.env)"
db="$(sed -n 's/^POSTGRES_DB=//p' converge.env)"
cat > "$out" <<ENV
# Made by scripts/make-secrets.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); not committed. Keep it private.
POSTGRES_PASSWORD=$password
CONVERGE_DATABASE_URL=postgresql://$user:$password@postgres:5432/$db
ENV
echo "secrets: wrote $out (mode 600)"
