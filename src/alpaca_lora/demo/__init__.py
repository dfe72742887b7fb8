"""The main job on the embedded default model, with built-in tasks that have one correct answer."""
