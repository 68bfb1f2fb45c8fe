"""robosuite-backed tasks behind Flotilla's task contract (sim/conventions.py).

Only the task modules import robosuite (and MuJoCo), and only when one is built, so importing
`sim.tasks` or `sim.experts` never pulls robosuite in.
"""
