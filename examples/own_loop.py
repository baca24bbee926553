"""atoll inside your own training loop (node/net/peer.py): your model, your data, your optimizer;
atoll only gossips the model with the swarm's other members after each of your rounds.

    python examples/own_loop.py --index 0 --nodes 2 --key /tmp/a.key
    python examples/own_loop.py --index 1 --nodes 2 --key /tmp/b.key -p MADDR   # MADDR: printed by the first

Each process fits a linear model to 16 samples of a 20-feature regression (too few alone) and
prints JSON lines: `joined` (with the multiaddrs to join through) and `done` (its held-out MSE,
and the MSE the same loop reaches without atoll).
"""

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from node.net.peer import Peer


def data(seed: int, n: int, truth: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, truth.shape[0], generator=g)
    return x, x @ truth + 0.1 * torch.randn(n, 1, generator=g)


def train(model, x, y, optimizer, steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        idx = torch.randint(len(x), (8,), generator=gen)
        optimizer.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        optimizer.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--key", required=True, help="this node's key file (created if missing)")
    p.add_argument("-p", "--initial-peers", nargs="*", default=[])
    p.add_argument("--swarm", default="own-loop")
    a = p.parse_args()
    torch.set_num_threads(1)
    truth = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    x, y = data(a.index + 1, 16, truth)
    x_test, y_test = data(12345, 500, truth)
    torch.manual_seed(0)  # the same init on every node
    model = torch.nn.Linear(20, 1)
    alone = copy.deepcopy(model)  # the same loop without atoll, for comparison
    config = {
        "node_index": a.index,
        "node_count": a.nodes,
        "train": {"rounds": a.rounds},
        "comm": {"topology": "ring", "fetch_timeout": 10},
        "metrics_port": None,
        "net": {"swarm": a.swarm, "identity_path": a.key, "initial_peers": a.initial_peers, "record_ttl": 10},
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    opt_alone = torch.optim.SGD(alone.parameters(), lr=0.02, momentum=0.9)
    with Peer.around(model, config, dataset_size=len(x)) as peer:
        print(json.dumps({"event": "joined", "maddrs": peer.maddrs}), flush=True)
        peer.wait()
        for r in range(peer.rounds):
            train(model, x, y, opt, 5, torch.Generator().manual_seed(r))  # your own steps
            train(alone, x, y, opt_alone, 5, torch.Generator().manual_seed(r))
            peer.step()  # gossip with the neighbours: the model is mixed in place
        peer.finish()
    with torch.no_grad():
        mse, mse_alone = (float(F.mse_loss(m(x_test), y_test)) for m in (model, alone))
    print(json.dumps({"event": "done", "mse": mse, "mse_alone": mse_alone}), flush=True)


if __name__ == "__main__":
    main()
