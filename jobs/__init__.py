"""What a user launches: the click CLI, job specs, the Ray drivers and submission."""
