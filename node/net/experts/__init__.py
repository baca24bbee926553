"""The diffusion experts and the router as live nodes: their gRPC services (service.py) and
the roles that train, checkpoint and serve them (roles.py). The maths is node/algo/experts/."""
