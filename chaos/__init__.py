"""The chaos run: every kind of misbehaving client against good counting
clients on one server, with a verdict per kind (``python chaos/chaos.py``)."""
