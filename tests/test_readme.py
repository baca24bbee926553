"""The README cannot drift from the CLI: every `atoll` command line in its code blocks parses
(options, types, and the --set fields against the config schema), every option its CLI
synopsis names exists, and the diffusion-experts walkthrough runs as written on loopback: four
expert daemons and a router, queries with missing experts, bad requests refused with clear
gRPC errors, and a SIGKILLed expert the router serves without."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from helpers import ROOT, Terminal

from node.app import cli

README = (ROOT / "README.md").read_text()
# placeholders the README uses, with values of the right form
PLACEHOLDERS = {
    "MADDR": "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWGpZbTizLcpLuW1VJ4tMvTj8x1gBQdNeXUQw5jDX3L8sV",
    "HOST:PORT": "127.0.0.1:5000",
}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```([a-z]*)\n(.*?)^```", text, flags=re.M | re.S)


def command_lines(body: str) -> list[list[str]]:
    """The `atoll ...` commands of a shell block, continuation lines joined, comments dropped,
    placeholders filled in."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        for name, value in PLACEHOLDERS.items():
            line = line.replace(name, value)
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0].endswith("atoll"):
                commands.append(words[1:])
    return commands


def command_of(path: list[str]):
    """The click command `atoll PATH...` (typer may vendor click: use it through typer only)."""
    cmd = typer.main.get_command(cli.app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def resolve(args: list[str]):
    """Parse `atoll ARGS` exactly as the CLI would, without running it: (click command, params).
    Raises click's UsageError / BadParameter for anything the CLI would refuse, KeyError for an
    unknown command. atoll's groups take no options, so leading words name the subcommand."""
    args, path = list(args), []
    while args and args[0] in getattr(command_of(path), "commands", {}):
        path.append(args.pop(0))
    cmd = command_of(path)
    if hasattr(cmd, "commands"):
        raise KeyError(f"atoll {' '.join(path)} needs a subcommand, got {args[:1]}")
    return cmd, cmd.make_context(" ".join(["atoll", *path]), args).params


SHELL_COMMANDS = [c for lang, body in code_blocks(README) if lang in ("bash", "sh") for c in command_lines(body)]


def test_the_readme_has_shell_commands_to_check():
    """Every block is a checked shell block or a Python block (run below), except the CLI
    synopsis (checked below), so a command cannot escape the checks by sitting in an untagged
    block."""
    blocks = code_blocks(README)
    synopsis = code_blocks(README.split("## CLI", 1)[1])[0]
    assert all(lang in ("bash", "sh", "python") or (lang, body) == synopsis for lang, body in blocks), blocks
    assert len(SHELL_COMMANDS) >= 8, SHELL_COMMANDS


PYTHON_BLOCKS = [body for lang, body in code_blocks(README) if lang == "python"]


@pytest.mark.parametrize("body", PYTHON_BLOCKS)
def test_every_readme_python_block_runs(body, monkeypatch, capsys):
    """The README's Python examples run as written, from the repository root."""
    monkeypatch.chdir(ROOT)
    exec(compile(body, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


# configs that an earlier README command writes (`atoll new task NAME` writes NAME.yaml)
WRITTEN = {f"{c[2]}.yaml" for c in SHELL_COMMANDS if c[:2] == ["new", "task"]}


@pytest.mark.parametrize("args", SHELL_COMMANDS, ids=[" ".join(a[:3]) for a in SHELL_COMMANDS])
def test_every_readme_command_parses(args, tmp_path):
    """Options and values as the CLI parses them; --set fields and -c files as the config
    loader validates them (the command itself is not run; a config an earlier README command
    writes is written here the same way first)."""
    try:
        cmd, params = resolve(args)
    except Exception as e:  # click's UsageError / BadParameter
        message = e.format_message() if hasattr(e, "format_message") else repr(e)
        pytest.fail(f"README command `atoll {' '.join(args)}` does not parse: {message}")
    if "set_" in params:
        from node.config import ConfigError, load_config, load_swarm_config, parse_override

        overrides = dict(parse_override(s) for s in params["set_"])
        config = params.get("config")
        if config is not None and str(config) in WRITTEN:
            new = [sys.executable, "-m", "node.app.cli", "new", "task", config.stem]
            subprocess.run(new, cwd=tmp_path, check=True, capture_output=True, timeout=60)
            config = tmp_path / config
        config = ROOT / config if config is not None and not config.is_absolute() else config
        try:
            if cmd.name == "up":
                load_swarm_config(config, overrides, params.get("nodes"))
            else:
                load_config(config, overrides)
        except ConfigError as e:
            pytest.fail(f"README command `atoll {' '.join(args)}`: {e}")


def _synopsis() -> list[str]:
    """The CLI section's block: one command per line, options in brackets."""
    section = README.split("## CLI", 1)[1]
    body = code_blocks(section)[0][1]
    return [part.strip() for line in body.splitlines() for part in line.split(";") if part.strip()]


@pytest.mark.parametrize("line", _synopsis())
def test_every_option_in_the_cli_synopsis_exists(line):
    path = []
    for w in line.split()[1:]:
        if not re.fullmatch(r"[a-z][a-z-]*", w):
            break
        path.append(w)
    try:
        cmd = command_of(path)
    except (KeyError, AttributeError):
        pytest.fail(f"synopsis names a command that does not exist: atoll {' '.join(path)}")
    known = {"--help"} | {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    named = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line))
    assert named <= known, f"`{line}`: {sorted(named - known)} are not options of atoll {' '.join(path)}"


def section() -> str:
    """The README's experts section."""
    return README.split("## Diffusion experts and the ensemble router", 1)[1].split("\n## ", 1)[0]


def _expert_walkthrough() -> list[list[str]]:
    return [shlex.split(line) for line in code_blocks(section())[0][1].splitlines() if line.startswith("atoll ")]


def _post(url: str, body: dict) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


# Smaller nets and fewer steps than the example config, so the walkthrough runs in a few minutes; these
# are appended, every flag the README shows is used as written (but the router's HTTP port, which a
# test cannot own: 0 picks a free one). The router's per-client Sample rate is raised: the test
# polls it twice a second.
BUDGET = ["--set", "experts.width=8", "--set", "experts.sample_steps=10", "--set", "experts.sample_rate=50"]
BUDGET += ["--set", "experts.feature_steps=100"]


@pytest.mark.slow  # keeps the default set under 10 minutes on 2 cores (`make test-all` runs it)
@pytest.mark.integration
def test_the_readme_expert_walkthrough_forms_a_4_expert_swarm_and_top2_uses_two_experts(tmp_path):
    steps = _expert_walkthrough()
    experts = [s[1:] for s in steps if s[1:3] == ["expert", "train"]]
    router = next(s[1:] for s in steps if s[1:3] == ["router", "serve"])
    query = next(s[1:] for s in steps if s[1:3] == ["router", "query"])
    assert len(experts) == 4, "the README shows one expert per cluster, K = 4"
    running: list[Terminal] = []

    def start(args: list[str], name: str, maddr: str | None, *budget: str) -> Terminal:
        here = {"MADDR": maddr, "8080": "0"}  # and the example config from the checkout, as a user's cwd would hold it
        args = [here.get(a, str(ROOT / a) if a.startswith("examples/") else a) for a in args]
        argv = [sys.executable, "-m", "node.app.cli", *args, *budget, *BUDGET]
        running.append(Terminal(argv, tmp_path / f"{name}.log", cwd=tmp_path))
        return running[-1]

    def ask() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node.app.cli", *[maddr if a == "MADDR" else a for a in query]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )

    try:
        first = start(experts[0], "e0", None, "--steps", "60")
        maddr = first.wait_for(r"^\s+(/ip4/\S+/p2p/\S+)$", 300).group(1)
        served = start(router, "router", maddr, "--set", "experts.router_steps=60")
        http = served.wait_for(r"HTTP API and page: (http://\S+)/ ", 300).group(1)

        # one expert of four live: the query still answers, says so, and warns
        alone = ask()
        assert alone.returncode == 0, alone.stderr[-2000:]
        assert "1 of 4 experts live: 0" in alone.stdout, alone.stdout
        assert "warning: top2 asks for 2 experts per image" in alone.stderr and "missing: 1, 2, 3" in alone.stderr
        over_http = _post(http + "/v1/samples", {"count": 2, "strategy": "top2"})  # and over HTTP
        assert over_http["live"] == [0] and over_http["missing"] == [1, 2, 3] and not over_http["complete"]
        assert "1 of 4 experts were live" in over_http["warning"], over_http

        for k, args in enumerate(experts[1:], start=1):
            start(args, f"e{k}", maddr, "--steps", "60")
        for t in running[2:]:
            t.wait_for(r"serving on", 300)
        router_addr = running[1].wait_for(r"router serving on (\S+)", 1).group(1)
        deadline = time.monotonic() + 60
        while len(_sample(router_addr, n=1, strategy="top1").live) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)  # until the router sees every expert's record (cheaper than the CLI)
        reply = ask()
        assert reply.returncode == 0 and "4 of 4 experts live" in reply.stdout, reply.stdout + reply.stderr
        per_step = re.findall(r"image +\d+: (\d+) per step, from experts", reply.stdout)
        assert per_step == ["2"] * 16, reply.stdout
        assert "warning" not in reply.stderr
        assert (tmp_path / "grid.png").stat().st_size > 0
        port = http.rsplit(":", 1)[1]
        from test_router_http import run_readme_curls

        health, samples, _ = run_readme_curls(int(port), tmp_path)
        assert json.loads(health)["status"] == "ok" and json.loads(samples)["count"] == 4
        assert (tmp_path / "samples.png").read_bytes().startswith(b"\x89PNG")
        assert _post(http + "/v1/samples", {"count": 4, "strategy": "top2"})["complete"] is True

        expert1_addr = running[2].wait_for(r"expert of cluster 1 serving on (\S+)", 1).group(1)
        _bad_requests_are_clear_errors(router_addr, expert1_addr, tmp_path)

        # an expert dies (SIGKILL, its DHT record lives on until its TTL): the router drops it
        # and serves every image with the others
        from p2pd.procs import kill_tree

        kill_tree(running[-1].proc.pid, signal.SIGKILL)
        reply = _sample(router_addr, n=8, strategy="full", seed=1)
        assert len(reply.served) == 8 and all(s.clusters and 3 not in s.clusters for s in reply.served)
    finally:
        codes = [t.ctrl_c() for t in running]
    assert codes[:-1] == [0] * (len(running) - 1), codes  # Ctrl-C: a clean exit (the last was killed)


def _sample(address: str, **kw):
    import grpc

    from p2pd.rpc import router_pb2 as pb
    from p2pd.rpc import router_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        return pb_grpc.RouterStub(ch).Sample(pb.SampleRequest(**kw), timeout=60)


def _bad_requests_are_clear_errors(router: str, expert: str, workdir: Path) -> None:
    """Requests a router or an expert must refuse with a clear gRPC error, serving on after.
    Predict requests are signed with the router's key, as the router signs them (a live
    member of the swarm); an unsigned one is refused before anything else is looked at."""
    import json

    import grpc
    import torch

    from node.net.experts.service import matrix_to_pb
    from p2pd.admission import sign_predict
    from p2pd.identity import Identity
    from p2pd.rpc import router_pb2 as pb
    from p2pd.rpc import router_pb2_grpc as pb_grpc

    member, expert_id = Identity.load_or_create(workdir / "r.key"), Identity.load_or_create(workdir / "e1.key").peer_id

    def signed(req: pb.PredictRequest) -> pb.PredictRequest:
        sign_predict(member, expert_id, req, time.time())
        return req

    def code_of(call):
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value.code(), e.value.details()

    assert code_of(lambda: _sample(router, n=100_000, strategy="top1"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, detail = code_of(lambda: _sample(router, n=2, strategy="top9"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "strategy" in detail
    assert code_of(lambda: _sample(router, n=2, strategy="top1", steps=10_000))[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.app.cli",
            "router",
            "query",
            "--router",
            router,
            "--n",
            "2",
            "--strategy",
            "best",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "strategy" in bad.stderr and "Traceback" not in bad.stderr
    digest = json.loads((workdir / "ck" / "expert-1" / "state.json").read_text())["meta"]["clustering"]
    with grpc.insecure_channel(expert) as ch:
        stub = pb_grpc.ExpertStub(ch)
        unsigned = pb.PredictRequest(x=matrix_to_pb(torch.zeros(2, 784)), t=[0.5, 0.5], cluster_digest=digest)
        code, detail = code_of(lambda: stub.Predict(unsigned, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "unsigned" in detail
        foreign = pb.PredictRequest(x=matrix_to_pb(torch.zeros(2, 784)), t=[0.5, 0.5], cluster_digest="x")
        assert code_of(lambda: stub.Predict(signed(foreign), timeout=10))[0] == grpc.StatusCode.FAILED_PRECONDITION
        wrong = pb.PredictRequest(x=matrix_to_pb(torch.zeros(2, 10)), t=[0.5, 0.5], cluster_digest=digest)
        code, detail = code_of(lambda: stub.Predict(signed(wrong), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "columns" in detail
        good = pb.PredictRequest(x=matrix_to_pb(torch.zeros(2, 784)), t=[0.5, 0.5], cluster_digest=digest)
        assert stub.Predict(signed(good), timeout=10).cluster == 1
    assert _sample(router, n=2, strategy="top1", seed=3).image_shape == [1, 28, 28]  # still serving
