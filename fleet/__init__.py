"""Fleet side of Flotilla: protocol, server, robot agent, operator SDK and the zarr episode store.

Nothing here imports torch, pybullet or the other parts, so the server starts lean.
"""
