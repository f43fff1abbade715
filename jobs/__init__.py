"""What a user launches: the click CLI, job specs and the Ray drivers."""
