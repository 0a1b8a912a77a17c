"""Test tooling shared by tests/, bench/, chaos/ and spam.sh (like
``trio.testing``): how to start a server and read what it says, what /proc
tells about a process, spam.sh's summary. Not installed: the package
``counter_server`` holds only what the server, the library and the load
client run."""
