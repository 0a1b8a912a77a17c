"""The counter server: lifecycle, connection loop, counter store and the
operational features around them, each in its own module."""
