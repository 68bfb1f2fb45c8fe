"""The teleoperator web console (see DESIGN.md)."""
