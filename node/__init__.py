"""atoll's node: the daemon, its round engine, the simulator and the command line."""
