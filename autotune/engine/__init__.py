"""The training engine: model, data, parallel plan, loop, probe. Never imports the planner."""
