"""Simulation: pybullet tasks, a robosuite adapter, scripted operators and the fleet harness."""
