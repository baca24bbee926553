"""Who talks to whom each round, and how models are mixed. Pure functions: no sockets, no clocks."""
