"""Data in and out of the episode store: other tools' dataset formats, and a look at an episode.

- diffusion_policy.py: Diffusion Policy's replay-buffer layout (zarr format 2, which its readers need).
- lerobot.py: LeRobotDataset v3.0 (parquet, PNG or mp4 per camera).
- view.py: `flotilla view`, an mp4 and a plot of one episode with its control labels coloured.
- jobs.py: the `flotilla export|import|view` settings and entry points.

The facts these modules build on are in ../shared/formats.md. Parquet and video need the `data` extra
(pyarrow, PyAV, pandas, matplotlib); they are imported inside the functions that use them, so the base
install keeps working, and a missing one is an error naming the extra.
"""
