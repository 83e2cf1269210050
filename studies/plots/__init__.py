"""Figures of trials and studies: what to plot (`data`, pure), how to draw it (`draw`, plotly), where
the data comes from (`load`, the database), and the dashboard's notes and figures (`dashboard`).

The split follows Optuna's `visualization/_optimization_history.py`: the figure data is computed
apart from the drawing and is tested without drawing.
"""
