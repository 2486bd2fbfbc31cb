"""Launch a training script as a SLURM job from a frozen copy of the code.

    python -m lingua.stool script=apps.main.train config=apps/main/configs/X.yaml nodes=N [ngpu=8 ...] \
        [dump_dir=... steps=... data.batch_size=...]

A `key=value` whose first part is not a StoolArgs field overrides the training config, as on
the training script's own command line. Relative paths of the config are resolved against the
directory stool runs in, because the job runs in its code snapshot. Everything is checked
before anything is written: the keys, that the script imports, that the config (with the
overrides) loads into the script's TrainArgs, that its data exists, that dump_dir is free (or
safe to reuse or delete). Then the code (.py and config files) is copied to dump_dir/code, the
config to dump_dir/base_config.yaml, a job script to dump_dir/submit.slurm, and the job is
submitted with sbatch (or run with bash).
The job asks for USR2 120 s before its time limit: the training loop saves, requeues the job
and exits; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from lingua.args import (
    ConfigError,
    _closest,
    _dotlist_to_dict,
    _leaf_keys,
    choice,
    cli_main,
    from_dict,
    load_yaml,
    resolve_layers,
    to_dict,
)
from lingua.data import DataArgs, DataError, source_files
from lingua.distributed import (
    DistributedArgs,
    block_node_layout,
    check_memory_parallel_within_nodes,
    clean_env,
    parallel_dims,
)

CODE_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".sh", ".txt", ".cfg", ".ini", ".toml"}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "data", "dump", "dumps", ".gl", ".whl"}
# What stool and training write into a dump_dir: override=true deletes a dir only if it holds one.
DUMP_MARKERS = ("base_config.yaml", "submit.slurm", "config.yaml", "metrics.jsonl", "train.log", "checkpoints", "code")
# Local paths of a training config. The job runs in dump_dir/code, so a relative one must be
# made absolute against the directory stool runs in, where the user wrote it from.
PATH_KEYS = ("dump_dir", "data.root_dir", "data.tokenizer.path", "checkpoint.path", "checkpoint.init_ckpt_path",
             "eval.validation.root_dir")


@dataclass
class StoolArgs:
    config: str = ""  # the training config (YAML); its dump_dir is where the job lives
    launcher: str = choice("sbatch", ("sbatch", "bash"))
    script: str = "apps.main.train"
    copy_code: bool = True
    dirs_exists_ok: bool = False  # reuse an existing dump_dir (a resubmission resumes from its checkpoints)
    override: bool = False  # delete an existing dump_dir first
    nodes: int = -1  # required
    ngpu: int = 8  # GPUs (and tasks) per node; 0 = a CPU job, one task per node
    ncpu: int = 16  # CPUs per task
    mem: str = ""
    anaconda: str = ""  # a conda env to activate in the job; empty = the python running stool
    constraint: str = ""
    exclude: str = ""
    time: int = -1  # minutes; -1 = the partition's maximum
    account: str = ""
    qos: str = ""
    partition: str = "learn"
    stdout: bool = False  # accepted for Meta Lingua configs; the log paths are always printed


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(stool's own arguments, training overrides): `key=value` items whose first key part is
    not a StoolArgs field override the training config."""
    fields = {f.name for f in dataclasses.fields(StoolArgs)}
    own, overrides = [], []
    for item in argv:
        key = item.split("=", 1)[0].split(".", 1)[0]
        (overrides if "=" in item and key and key not in fields else own).append(item)
    return own, overrides


def resolve_paths(config: dict, base: Path) -> dict:
    """PATH_KEYS that are set and relative become absolute under `base` (in place)."""
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), str) or not node[leaf]:
            continue
        if "://" in node[leaf]:  # fsspec URLs are not local paths
            continue
        path = Path(node[leaf]).expanduser()
        node[leaf] = str(path if path.is_absolute() else Path(os.path.normpath(base / path)))
    return config


def apply_overrides(config: dict, overrides: list[str], train_args_cls: Optional[type]) -> dict:
    tree = _dotlist_to_dict(overrides)
    if train_args_cls is not None:
        # A top-level typo may be meant for stool (nodez) or for training (stepz): suggest from both.
        train_keys = [f.name for f in dataclasses.fields(train_args_cls) if f.init]
        stool_keys = [f.name for f in dataclasses.fields(StoolArgs)]
        for key, value in tree.items():
            if key not in train_keys:
                leaves = ", ".join(f"'{k}'" for k in _leaf_keys(value, key))
                raise ConfigError(f"unknown config key {leaves}{_closest(key, train_keys + stool_keys)} "
                                  "(on the stool command line)")
    # Resolved here: stool needs the real dump_dir (`./dump/${name}`) to snapshot the code into.
    defaults = to_dict(train_args_cls()) if train_args_cls is not None else None
    return resolve_layers(config, tree, defaults=defaults, keep_defaults=False)


def check_existing_dump_dir(args: StoolArgs, dump_dir: Path) -> None:
    """dump_dir exists: refuse unless it is the user's wish and only stool's own files are at stake."""
    if not (args.dirs_exists_ok or args.override):
        raise ConfigError(f"dump_dir {dump_dir} already exists: pass dirs_exists_ok=true to reuse it (the job "
                          "resumes from its checkpoints) or override=true to delete it first")
    if not dump_dir.is_dir():
        raise ConfigError(f"dump_dir {dump_dir} exists and is not a directory")
    mode = "override=true would delete it" if args.override else "dirs_exists_ok=true would write into it"
    for what, path in (("the repository", repo_root()), ("the current directory", Path.cwd()),
                       ("your home directory", Path.home()), ("the root directory", Path("/"))):
        path = path.resolve()
        if path.is_relative_to(dump_dir):
            relation = "is" if path == dump_dir else "contains"
            raise ConfigError(f"dump_dir {dump_dir} {relation} {what} ({path}): {mode}; give each run a "
                              "dump_dir of its own (e.g. dump_dir=./dump/<name>)")
    if args.override and any(dump_dir.iterdir()) and not any((dump_dir / m).exists() for m in DUMP_MARKERS):
        raise ConfigError(f"dump_dir {dump_dir} does not look like a dump dir (it has none of "
                          f"{', '.join(DUMP_MARKERS)}): {mode}; delete it yourself if you mean it")
    if args.dirs_exists_ok and args.copy_code and (dump_dir / "code").exists() \
            and not (dump_dir / "submit.slurm").exists():
        raise ConfigError(f"dump_dir {dump_dir} holds a code/ that stool did not write (no submit.slurm next "
                          "to it), and the code snapshot would replace it: move it, or pick another dump_dir")


def validate(args: StoolArgs, overrides: Optional[list[str]] = None) -> tuple[dict, Path]:
    """All checks, before anything is written. Returns (config dict with the overrides applied
    and absolute paths, dump_dir)."""
    if args.nodes < 1:
        raise ConfigError(f"nodes must be given and >= 1 (got nodes={args.nodes}), e.g. nodes=1")
    if args.ngpu < 0 or args.ncpu < 1:
        raise ConfigError(f"ngpu must be >= 0 and ncpu >= 1 (got ngpu={args.ngpu}, ncpu={args.ncpu})")
    if not args.config:
        raise ConfigError("config is required, e.g. config=apps/main/configs/debug.yaml")
    if args.override and args.dirs_exists_ok:
        raise ConfigError("override=true and dirs_exists_ok=true contradict each other: pick one")
    config = load_yaml(args.config)
    try:
        spec = importlib.util.find_spec(args.script)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(f"script '{args.script}' is not an importable module (e.g. script=apps.main.train)")
    try:
        module = importlib.import_module(args.script)
    except Exception as e:  # a broken script must not be submitted
        raise ConfigError(f"script '{args.script}' fails to import: {type(e).__name__}: {e}") from None
    # The script's config class: CONFIG_ARGS where it has its own (apps.hmt.train), else TrainArgs.
    train_args_cls = getattr(module, "CONFIG_ARGS", None) or getattr(module, "TrainArgs", None)
    config = resolve_paths(apply_overrides(config, overrides or [], train_args_cls), Path.cwd())
    if train_args_cls is not None:
        try:
            train_args = from_dict(train_args_cls, config)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {args.config}{' or the command line' if overrides else ''})") from None
        distributed = getattr(train_args, "distributed", None)
        if isinstance(distributed, DistributedArgs):
            check_layout(args, distributed)
        data = getattr(train_args, "data", None)
        if isinstance(data, DataArgs):
            try:
                source_files(data)
            except DataError as e:
                raise ConfigError(f"{e} (relative paths of the config are resolved against {Path.cwd()}, "
                                  "where stool runs)") from None
    if not config.get("dump_dir"):
        raise ConfigError(f"{args.config} has no dump_dir: the job needs one to live in (or pass dump_dir=...)")
    if "://" in str(config["dump_dir"]):
        raise ConfigError(f"dump_dir='{config['dump_dir']}' is an fsspec URL, but stool puts the job's code, script "
                          "and SLURM logs in dump_dir: give it a shared filesystem path, and checkpoint.path the URL "
                          "for the checkpoints")
    dump_dir = Path(config["dump_dir"]).resolve()
    if dump_dir.exists():
        check_existing_dump_dir(args, dump_dir)
    if args.launcher == "sbatch" and shutil.which("sbatch") is None:
        raise ConfigError("launcher=sbatch but sbatch is not on PATH (on a workstation: bash setup/local_slurm.sh)")
    return config, dump_dir


def check_layout(args: StoolArgs, distributed: DistributedArgs) -> None:
    """The job's parallel layout over nodes x tasks per node, checked as the job will check it,
    but before submitting (the job's srun places ranks in node order: --distribution=block)."""
    tasks = max(1, args.ngpu)
    world = args.nodes * tasks
    try:
        dims = parallel_dims(distributed, world)
        check_memory_parallel_within_nodes(dims, block_node_layout(world, tasks),
                                           distributed.memory_parallel_across_nodes)
    except ValueError as e:
        raise ConfigError(f"{e} (the job: nodes={args.nodes} x {tasks} task(s) per node = {world} processes)") from None


def code_files(root: Path) -> list[Path]:
    """The code and config files of the repo, relative to root (no data, dumps or envs)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in CODE_SUFFIXES:
                out.append(path.relative_to(root))
    return sorted(out)


def copy_code(root: Path, dest: Path) -> int:
    files = [f for f in code_files(root) if not (root / f).resolve().is_relative_to(dest.parent)]
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)
    return len(files)


def job_script(args: StoolArgs, name: str, log_dir: Path, code_dir: Path, config_path: Path) -> str:
    """The sbatch script: resources, USR2 warning, append-mode logs, `srun python -m script`."""
    tasks_per_node = max(1, args.ngpu)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        f"#SBATCH --cpus-per-task={args.ncpu}",
        f"#SBATCH --output={log_dir}/%j.stdout",
        f"#SBATCH --error={log_dir}/%j.stderr",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --distribution=block",
    ]
    if args.ngpu > 0:
        lines.append(f"#SBATCH --gres=gpu:{args.ngpu}")
    if args.time >= 0:
        lines.append(f"#SBATCH --time={args.time}")
    for flag, value in (("partition", args.partition), ("mem", args.mem), ("constraint", args.constraint),
                        ("exclude", args.exclude), ("account", args.account), ("qos", args.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    python = "python" if args.anaconda else shlex.quote(sys.executable)
    activate = f"source activate {shlex.quote(args.anaconda)}" if args.anaconda else "# env: the python that ran stool"
    lines += [
        "",
        activate,
        f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"cd {shlex.quote(str(code_dir))}",
        "echo \"job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date)\"",
        "# srun under sbatch; plain python when this script runs with bash (launcher=bash)",
        'if [ -n "${SLURM_JOB_ID:-}" ]; then LAUNCH="srun --kill-on-bad-exit=1"; else LAUNCH=""; fi',
        f"$LAUNCH {python} -u -m {args.script} config={shlex.quote(str(config_path))}",
        "",
    ]
    return "\n".join(lines)


def launch(args: StoolArgs, overrides: Optional[list[str]] = None) -> Optional[str]:
    """Validate, write dump_dir, submit. Returns the job id (sbatch) or None (bash)."""
    config, dump_dir = validate(args, overrides)
    if args.override and dump_dir.exists():
        shutil.rmtree(dump_dir)
    root = repo_root()
    code_dir = dump_dir / "code" if args.copy_code else root
    (dump_dir / "logs").mkdir(parents=True, exist_ok=True)
    if args.copy_code:
        if code_dir.exists():
            shutil.rmtree(code_dir)  # ours (validate checked): a snapshot of an earlier submission
        n = copy_code(root, code_dir)
        print(f"code snapshot: {n} files from {root} -> {code_dir}")
    config = {**config, "dump_dir": str(dump_dir)}
    (dump_dir / "base_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    submit = dump_dir / "submit.slurm"
    submit.write_text(job_script(args, config.get("name", "lingua"), dump_dir / "logs", code_dir,
                                 dump_dir / "base_config.yaml"))
    if args.launcher == "bash":
        print(f"running {submit} with bash (logs on this terminal)")
        subprocess.run(["bash", str(submit)], check=True, env=clean_env())
        return None
    try:
        job_id = sbatch(submit)
    except RuntimeError as e:
        raise SystemExit(f"{e}\ndump_dir {dump_dir} is kept; fix the cause and resubmit with dirs_exists_ok=true")
    print(f"Submitted batch job {job_id}")
    print(f"dump_dir: {dump_dir}\n"
          f"follow:   tail -f {dump_dir}/logs/{job_id}.stdout {dump_dir}/logs/{job_id}.stderr\n"
          f"status:   squeue -j {job_id}    cancel: scancel {job_id}\n"
          f"metrics:  {dump_dir}/metrics.jsonl")
    return job_id


def sbatch(script: Path) -> str:
    """Submit with a clean environment (no inherited job variables); returns the job id."""
    out = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, env=clean_env())
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip().split()[-1]


def submit_eval_job(train_dump_dir: Path, ckpt: Path, step: int, eval_config: dict, ngpu: int,
                    ncpu: int = 1, partition: Optional[str] = None) -> str:
    """Evaluate a just-saved checkpoint in its own SLURM job (any number of GPUs, or CPUs when
    ngpu=0), with the training job's code; metrics land in the training dump_dir."""
    eval_dir = Path(train_dump_dir) / "evals" / f"{step:010d}"
    (eval_dir / "logs").mkdir(parents=True, exist_ok=True)
    config = {**eval_config, "ckpt_dir": str(ckpt), "dump_dir": str(train_dump_dir), "global_step": step}
    config_path = eval_dir / "eval.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = StoolArgs(config=str(config_path), script="apps.main.eval", nodes=1, ngpu=ngpu, ncpu=ncpu,
                     partition=partition if partition is not None else os.environ.get("SLURM_JOB_PARTITION", ""))
    script = eval_dir / "submit.slurm"
    script.write_text(job_script(args, f"eval_{step}", eval_dir / "logs", repo_root(), config_path))
    return sbatch(script)


def main(argv: Optional[list[str]] = None) -> Optional[str]:
    own, overrides = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = cli_main(StoolArgs, own, config_file=False)
    try:
        return launch(args, overrides)
    except ConfigError as e:
        print(f"stool: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
