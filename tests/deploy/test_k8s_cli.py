"""The commands in the manifests are ones the code accepts: every `sovereign ...` container command is parsed by the
real typer app (make_context on the resolved subcommand: options, types, required values; nothing runs),
and the config files the containers are pointed at load with the code's own config models."""

# The session fixtures are imported from k8s_manifests (a conftest.py here would shadow tests/conftest.py), so
# test arguments shadow those imports by design.
# ruff: noqa: F811

from __future__ import annotations

import pytest
import typer
from k8s_manifests import (
    OVERLAYS,
    SAMPLE_JOB_ID,
    by_kind,
    containers,
    expanded_argv,
    find,
    ident,
    mounted_file,
    pod_labels,
    rendered,  # noqa: F401 (session fixtures)
    workloads,
)

from serving.profile import ServingProfile
from sovereign.cli import build_app

try:  # typer vendors its own click since 0.2x; older typer uses click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

# The subcommands other rooms add; until a room is merged its command is absent and its case is skipped, naming it.
ROOM_OF = {"gateway": "gateway (issue 3)", "finetune": "finetune (issue 4)", "run-job": "finetune (issue 4)"}


def _root():
    return typer.main.get_command(build_app())


def _is_group(cmd) -> bool:
    return isinstance(cmd, typer.core.TyperGroup)


def parse(argv: list[str]) -> tuple[list[str], typer.Context]:
    """Resolve `sovereign ARGV` to its leaf command and parse the leaf's arguments; (command path, context)."""
    assert argv[0] == "sovereign", argv
    cmd = _root()
    ctx = typer.Context(cmd, info_name="sovereign")
    args, path = argv[1:], []
    while _is_group(cmd):
        if args and args[0] in ROOM_OF and cmd.get_command(ctx, args[0]) is None:
            pytest.skip(f"`sovereign {' '.join([*path, args[0]])}` is not in this checkout yet: the {ROOM_OF[args[0]]}"
                        " room adds it")
        name, cmd, args = cmd.resolve_command(ctx, args)
        path.append(name)
        ctx = typer.Context(cmd, info_name=name, parent=ctx) if _is_group(cmd) else ctx
    leaf = cmd.make_context(path[-1], list(args), parent=ctx)
    return path, leaf


def _sovereign_containers(objects):
    for obj, spec in workloads(objects):
        for c in containers(spec):
            if c.get("command", [None])[0] == "sovereign":
                yield obj, spec, c


def _cases():
    return [(overlay, component) for overlay in OVERLAYS
            for component in ("serving", "gateway", "finetune", "audit-retention")]


@pytest.mark.parametrize(("overlay", "component"), _cases())
def test_container_commands_parse_with_the_real_cli(rendered, overlay, component):
    found = [(o, s, c) for o, s, c in _sovereign_containers(rendered[overlay])
             if pod_labels(o)["app.kubernetes.io/component"] == component]
    assert found, f"{overlay}: no `sovereign` container for {component}"
    for obj, spec, c in found:
        argv = expanded_argv(c)
        assert not any("$(" in a for a in argv), f"{ident(obj, c)}: unexpanded variable in {argv}"
        path, ctx = parse(argv)
        p = ctx.params
        if component == "serving":
            assert path == ["serve"]
            assert (p["host"], p["port"], p["health_port"]) == ("0.0.0.0", 8000, 8001)
            assert p["model"] and p["profile"]
        elif component == "gateway":
            assert path == ["gateway"]
            assert (p["config"], p["host"], p["port"]) == ("/etc/sovereign/gateway.yaml", "0.0.0.0", 8080)
        elif component == "audit-retention":
            # Unattended: it must not wait for a "yes", and it keeps what it prunes on the archive volume.
            assert path == ["audit", "prune"] and p["yes"] and p["older_than"] and not p["no_archive"]
            archive = next(m for m in c["volumeMounts"] if m["mountPath"] == str(p["archive_dir"]))
            volume = next(v for v in spec["volumes"] if v["name"] == archive["name"])
            assert volume["persistentVolumeClaim"]["claimName"] == "sovereign-audit-archive"
            db = next(e for e in c["env"] if e["name"] == "SOVEREIGN_GATEWAY_DATABASE_URL")
            assert db["valueFrom"]["secretKeyRef"] == {"name": "sovereign-gateway-secrets", "key": "database-url"}
        else:
            assert path == ["finetune", "run-job"]
            assert f"/var/lib/sovereign/jobs/{SAMPLE_JOB_ID}" in {str(v) for v in p.values()}, p


def test_a_wrong_option_in_a_manifest_would_fail_this_check():
    """The parse is strict: a typo'd option or a bad port is refused, so the tests above do prove something."""
    good = ["sovereign", "serve", "--profile", "cpu", "--model", "m", "--host", "0.0.0.0", "--port", "8000",
            "--health-port", "8001"]
    assert parse(good)[1].params["port"] == 8000
    with pytest.raises(UsageError, match="healthport"):
        parse([*good[:-2], "--healthport", "8001"])
    with pytest.raises(typer.BadParameter):
        parse([*good[:-1], "eight"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_vllm_deployment_mounts_a_profile_the_supervisor_accepts(rendered, overlay, tmp_path):
    for obj, spec, c in _sovereign_containers(rendered[overlay]):
        if pod_labels(obj)["app.kubernetes.io/component"] != "serving":
            continue
        _, ctx = parse(expanded_argv(c))
        profile_file = tmp_path / f"{obj['metadata']['name']}.yaml"
        profile_file.write_text(mounted_file(spec, c, ctx.params["profile"], rendered[overlay]))
        prof = ServingProfile.load(profile_file)
        # The profile's ports are the ones the probes and the Service use; CUDA profiles run on GPU pods only.
        assert (prof.port, prof.health_port) == (ctx.params["port"], ctx.params["health_port"])
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert (prof.device == "cuda") == (gpus is not None), f"{ident(obj)}: {prof.device} profile, gpus={gpus}"
        if prof.device == "cpu":
            # vLLM's CPU KV cache lives in the container's memory: leave room for weights and the runtime.
            limit_gib = _gib(c["resources"]["limits"]["memory"])
            assert prof.kv_cache_gib is not None and prof.kv_cache_gib <= limit_gib / 2, ident(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_config_loads_with_the_gateway_config_model(rendered, overlay, tmp_path):
    config_mod = pytest.importorskip("gateway.config", reason="the gateway room (issue 3) adds gateway.config")
    objects = rendered[overlay]
    gw = find(objects, "Deployment", "sovereign-gateway")
    spec = gw["spec"]["template"]["spec"]
    c = spec["containers"][0]
    path, ctx = parse(expanded_argv(c))
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(mounted_file(spec, c, ctx.params["config"], objects))
    cfg = config_mod.GatewayConfig.load(config_file)
    assert cfg.models, "the gateway routes no model"
    # Secrets stay out of the file: they come from the Secret through the environment.
    assert cfg.database_url is None and cfg.redis_url is None and cfg.bootstrap_key is None
    # Fine-tune jobs become Kubernetes Jobs from the template the Deployment mounts (the gateway image cannot train).
    assert cfg.fine_tuning.runner == "kubernetes"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(cfg.fine_tuning.kubernetes.template_dir)])
    assert volume["configMap"]["name"].startswith("sovereign-finetune-job")
    served = {e["value"] for d in by_kind(objects, "Deployment") if pod_labels(d)["app.kubernetes.io/component"]
              == "serving" for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
              if e["name"] == "SOVEREIGN_MODEL"}
    assert set(cfg.models) == served


def _gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    raise ValueError(f"unexpected memory quantity {quantity}")


# vLLM's own argument parser, run in a child process (importing vLLM pulls in torch): exits non-zero on a bad flag.
_VLLM_PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
for argv in json.loads(sys.argv[1]):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    print(json.dumps({"port": args.port, "host": args.host, "max_lora_rank": args.max_lora_rank}))
"""


def test_the_vllm_command_line_each_overlay_produces_parses_with_vllms_own_parser(rendered, tmp_path):
    """What the supervisor will hand vLLM in each pod (profile from the ConfigMap, ports from the container's
    arguments), checked by the vLLM version this repository pins, for the CPU and the GPU profiles alike."""
    import json
    import subprocess
    import sys

    from serving.store import ModelStore
    from sovereign.offline import offline_env

    pytest.importorskip("vllm", reason="vLLM (the cpu extra) is not installed")
    cases = []
    for overlay in OVERLAYS:
        for obj, spec, c in _sovereign_containers(rendered[overlay]):
            if pod_labels(obj)["app.kubernetes.io/component"] != "serving":
                continue
            _, ctx = parse(expanded_argv(c))
            p = ctx.params
            profile_file = tmp_path / f"{overlay}-{obj['metadata']['name']}.yaml"
            profile_file.write_text(mounted_file(spec, c, p["profile"], rendered[overlay]))
            prof = ServingProfile.load(profile_file, host=p["host"], port=p["port"], health_port=p["health_port"])
            model_dir = ModelStore(tmp_path / "models").path(p["model"])
            cases.append(prof.vllm_args(model_dir, p["model"]))
    assert len(cases) >= 2
    proc = subprocess.run([sys.executable, "-c", _VLLM_PARSE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env=offline_env())
    assert proc.returncode == 0, f"vLLM refused a command line:\n{proc.stderr[-3000:]}"
    parsed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(a["host"], a["port"]) for a in parsed] == [("0.0.0.0", 8000)] * len(cases)


def test_the_deploy_guides_sovereign_commands_parse_with_the_real_cli():
    """Every `... -- sovereign ...` an administrator copies from deploy/k8s/README.md is a command the CLI accepts."""
    import re
    import shlex

    from k8s_manifests import K8S

    guide = (K8S / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", guide, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0] if " #" in line else line)
            if words and words[0] == "kubectl" and "--" in words and words[words.index("--") + 1] == "sovereign":
                commands.append(words[words.index("--") + 1:])
    assert len(commands) >= 6, commands
    for argv in commands:
        path, _ = parse(argv)
        assert path, argv
