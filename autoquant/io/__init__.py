"""Files: written atomically (a crash never leaves half a file), YAML read safely (no tags,
no alias bombs), state dicts loaded without unpickling code, and the names of the files a
saved result and a run directory hold."""
