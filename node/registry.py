"""The names of atoll's interchangeable algorithms, in one place. The config validates names
against these tuples; each implementing module dispatches on them and checks at import that
it implements exactly these with `check_registered` (so a name cannot be added in one place only). No imports:
the config (which everything uses) depends on this file, not on the algorithms.

- TOPOLOGIES: node/algo/comm/topology.py (gossip graphs);
- AGGREGATORS: node/algo/aggregate/robust.py (how neighbour models are combined); SLICE_AGGREGATORS, those that
  also work slice by slice inside an all-reduce: node/algo/comm/allreduce.py;
- ATTACKS and ATTACK_PARAMS: node/algo/security/attacks.py (attack rehearsals);
- EXCHANGES, ALGORITHMS: node/protocol/rounds/ (the round protocols; ranks: FRL, node/algo/frl.py);
- DISTILL_METHODS: node/algo/distill/ (logit exchange).
"""

TOPOLOGIES = ("ring", "torus", "exponential", "random", "complete")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "clipped", "sybilwall", "bristle")
SLICE_AGGREGATORS = ("mean", "median", "trimmed_mean")
ATTACKS = ("label_flip", "sign_flip", "gaussian", "alie", "ipm", "free_ride", "sybil", "reverse")
ATTACK_PARAMS = ("scale", "sigma", "epsilon", "z", "free_ride_mode", "jitter", "data_of")
EXCHANGES = ("model", "logits", "ranks")
ALGORITHMS = ("gossip", "modest", "diloco")
DISTILL_METHODS = ("edgefd", "knfu", "edgefd+knfu", "fedd2s")


def check_registered(point: str, implemented, names) -> None:
    """Raise RuntimeError (at import of the implementing module) unless `implemented` (names) are exactly `names`:
    an extension point `point` whose names and implementations drifted apart is a bug, found at once."""
    if set(implemented) != set(names):
        missing, extra = sorted(set(names) - set(implemented)), sorted(set(implemented) - set(names))
        raise RuntimeError(
            f"{point}: registry names without implementation {missing}, implementations without name {extra}"
        )
