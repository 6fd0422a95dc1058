"""`launcher` — the user's door. Verbs and flags are a public contract (DESIGN.md "CLI contract")."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import SpecError, UserError

# Every package logger is "lmforge." + its module path (the console filter below keys on the root); spelled
# out here because `python -m launcher.cli` (the detached driver) runs this module as __main__.
log = logging.getLogger("lmforge.launcher.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launcher", description="Train efficient LMs on Ray + DeepSpeed.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("submit", help="run a job from a spec (re-submitting a name resumes it)")
    s.add_argument("config")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--name")
    s.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    s.add_argument("--detach", action="store_true", help="return at once; follow with `launcher logs NAME --follow`")

    s = sub.add_parser("status", help="state of one job, or of all known jobs")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("logs", help="driver and rank logs of a job")
    s.add_argument("name")
    s.add_argument("--follow", action="store_true")

    s = sub.add_parser("stop", help="checkpoint and stop a running job")
    s.add_argument("name")
    s.add_argument("--timeout", type=float, default=120.0)

    s = sub.add_parser("resume", help="continue a job from its newest good checkpoint")
    s.add_argument("name")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--address")
    s.add_argument("--detach", action="store_true")

    s = sub.add_parser("data", help="data preparation")
    dsub = s.add_subparsers(dest="data_verb", required=True)
    d = dsub.add_parser("prepare", help="corpus -> tokenizer -> webdataset shards + manifest")
    d.add_argument("--corpus", default="builtin", help="builtin, or a .txt/.jsonl file or directory")
    d.add_argument("--vocab-size", type=int, default=8192)
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--out", help="output directory (default: the cache directory jobs use)")
    d.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    d.add_argument("--samples-per-shard", type=int, default=2048)

    s = sub.add_parser("eval", help="validation loss of a job's newest checkpoint (or a checkpoint directory)")
    s.add_argument("target")
    s.add_argument("--samples", type=int, default=None, help="validation samples (default: all)")
    s.add_argument("--tasks", help="comma-separated: ppl, blimp (without: the validation loss as JSON)")
    s.add_argument("--blimp-dir", help="BLiMP's <paradigm>.jsonl directory (for --tasks blimp)")
    s.add_argument("--blimp-pairs", type=int, help="the first N pairs of each BLiMP paradigm (default: all)")
    s.add_argument("--json", action="store_true", help="one JSON object instead of a table (with --tasks)")
    s.add_argument("--no-log", action="store_true", help="do not log the task metrics into the job's MLflow run")

    s = sub.add_parser("export", help="a checkpoint as a transformers directory (--format hf) or plain safetensors")
    s.add_argument("target", help="a job name or a checkpoint directory")
    s.add_argument("--format", dest="fmt", default="hf", help="hf (Transformer++ as Llama / Qwen2) or safetensors")
    s.add_argument("--out", required=True, help="directory to create (absent or empty)")

    s = sub.add_parser("generate", help="text from a checkpoint, decoded through the architecture's cache")
    s.add_argument("target", help="a job name or a checkpoint directory")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="one JSON object: tokens, text, tokens/s")

    s = sub.add_parser("plan", help="parameters, memory and FLOPs per rank of a spec's layout (starts nothing)")
    s.add_argument("config")
    s.add_argument("--world", type=int, help="number of ranks (overrides cluster.workers)")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--json", action="store_true", help="one JSON object (keys: parallel/plan.py)")
    s.add_argument("--peak-tflops", type=float, help="per-rank peak, to predict the step time")
    s.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed with --peak-tflops")

    s = sub.add_parser("_run", help=argparse.SUPPRESS)  # the detached driver
    s.add_argument("job_dir")
    s.add_argument("--address")
    return p


def _setup_logging(debug: bool, logfile: Path | None = None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.DEBUG if debug else logging.INFO)
    # Library chatter (DeepSpeed, Ray) stays in the log files unless --debug; ours is every logger under
    # "lmforge" (`logging.getLogger("lmforge." + __name__)` in each package module).
    console.addFilter(lambda r: debug or r.name.startswith("lmforge") or r.levelno >= logging.ERROR)
    root.addHandler(console)
    if logfile:
        fh = logging.FileHandler(logfile)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _load_validated(config: Path | str, sets: list[str], address: str | None = None):
    """The spec, validated against where it will run: the Ray cluster at the resolved address (its nodes'
    CPUs and GPUs; this process stays connected for the driver), or this host's cores and RAM for the
    embedded cluster."""
    from launcher.cluster import resolve_address, validate_on_cluster
    from launcher.spec import load_spec
    from launcher.validate import validate, validate_local_machine

    spec = load_spec(config, sets)
    address = resolve_address(address, spec)
    validate(spec, address)
    if address:
        validate_on_cluster(spec, address)
    else:
        validate_local_machine(spec)
    return spec


def _job_for(spec, name: str):
    """The job directory for `name` under train.output_dir, locked for this driver (JobError if another holds it)."""
    from launcher.jobs import DriverLock, job_dir

    job = job_dir(spec.train.output_dir, name)
    return job, DriverLock(job).acquire()


def _start(job_and_lock, spec, address: str | None, detach: bool, debug: bool) -> int:
    from launcher import jobs
    from launcher.orchestrator import run_job
    from launcher.spec import dump_spec

    job, lock = job_and_lock
    try:
        job.create()
        jobs.register(job)
        if detach:
            dump_spec(spec, job.spec)
            cmd = [sys.executable, "-m", "launcher.cli", "_run", str(job.path)] + (["--address", address] if address else [])
            with open(job.logs / "driver.log", "ab") as out:
                # The driver inherits the job's lock (the same open file): it holds it after this process exits.
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, pass_fds=(lock.fd,))
            job.update_state(name=job.name, state="PENDING", driver_pid=proc.pid, job_dir=str(job.path))
            print(f"submitted {job.name} (driver pid {proc.pid}); follow with: launcher logs {job.name} --follow")
            return 0
        _setup_logging(debug, job.logs / "driver.log")
        final = run_job(job, spec, address=address, show_bar=sys.stderr.isatty())
    finally:
        lock.release()
    _summary(final)
    return 0 if final.get("state") == "SUCCEEDED" else 1


def _summary(final: dict) -> None:
    from launcher import tracking

    ml = final.get("mlflow") or {}
    print(f"job {final.get('name')}: {final.get('state')} at step {final.get('step')}"
          + (f" — {final['error']}" if final.get("error") else ""))
    if ml.get("run_id"):
        try:
            loss = tracking.metric_history(ml["tracking_uri"], ml["run_id"], "loss")
            val = tracking.metric_history(ml["tracking_uri"], ml["run_id"], "val_loss")
            if loss:
                print(f"loss at step {loss[0][0]}: {loss[0][1]:.4f}")
            if val:
                print(f"val_loss at step {val[-1][0]}: {val[-1][1]:.4f}")
        except Exception as e:  # noqa: BLE001 - the summary must not hide the job's own outcome
            log.warning("could not read metrics back: %s", e)
        print(f"mlflow run id: {ml['run_id']}")
        print(f"tracking uri: {ml['tracking_uri']}")
        print(f"view it: mlflow ui --backend-store-uri {ml['tracking_uri']}")


def cmd_submit(args) -> int:
    from launcher.cluster import resolve_address
    from launcher.jobs import check_name, default_name

    if args.name is not None:
        check_name(args.name)  # before anything is read or written
    spec = _load_validated(args.config, args.sets, args.address)
    name = args.name or default_name(Path(args.config).stem)
    return _start(_job_for(spec, name), spec, resolve_address(args.address, spec), args.detach, args.debug)


def cmd_resume(args) -> int:
    from launcher import jobs

    from launcher.cluster import resolve_address

    job = jobs.find(args.name)
    spec = _load_validated(job.spec, args.sets, args.address)
    address = resolve_address(args.address, spec)
    return _start((job, jobs.DriverLock(job).acquire()), spec, address, args.detach, args.debug)


def cmd_run(args) -> int:
    from launcher.jobs import JobDir
    from launcher.orchestrator import run_job
    from launcher.spec import load_spec

    job = JobDir(Path(args.job_dir))
    _setup_logging(args.debug)
    final = run_job(job, load_spec(job.spec), address=args.address)
    _summary(final)
    return 0 if final.get("state") == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    from launcher import jobs

    if args.name:
        st = jobs.status(jobs.find(args.name))
        if args.json:
            print(json.dumps(st, indent=1))
        else:
            _print_status([st])
        return 0
    sts = []
    for name, path in sorted(jobs.registered().items()):
        job = jobs.JobDir(Path(path))
        if job.state_file.exists():
            sts.append(jobs.status(job))
    print(json.dumps(sts, indent=1)) if args.json else _print_status(sts)
    return 0


def _print_status(sts: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "state", "step", "restarts", "workers", "last checkpoint", "mlflow run")
    for s in sts:
        workers = ", ".join(f"{w['rank']}:{w['host']}/{w['pid']}" for w in s["workers"])
        table.add_row(s["name"], s["state"], str(s["step"]), str(s["restarts"]), workers,
                      Path(s["last_checkpoint"]).name if s["last_checkpoint"] else "-", (s["mlflow"] or {}).get("run_id", "-"))
    Console().print(table)


def cmd_logs(args) -> int:
    from launcher import jobs

    job = jobs.find(args.name)
    files = [job.logs / "driver.log"] + sorted(job.logs.glob("rank*.log"))
    if not args.follow:
        for f in files:
            if f.exists():
                print(f"==> {f.name} <==")
                sys.stdout.write(f.read_text(errors="replace"))
        return 0
    positions: dict[Path, int] = {}
    while True:
        for f in [job.logs / "driver.log"] + sorted(job.logs.glob("rank*.log")):
            if f.exists():
                with open(f, errors="replace") as fh:
                    fh.seek(positions.get(f, 0))
                    chunk = fh.read()
                    positions[f] = fh.tell()
                if chunk:
                    sys.stdout.write("".join(f"[{f.stem}] {line}\n" for line in chunk.splitlines()))
                    sys.stdout.flush()
        if jobs.status(job)["state"] in jobs.TERMINAL:
            return 0
        time.sleep(1)


def cmd_stop(args) -> int:
    import signal

    from launcher import jobs
    from launcher.jobs import wait_terminal

    job = jobs.find(args.name)
    st = jobs.status(job)
    if st["state"] in jobs.TERMINAL:
        print(f"job {job.name} is not running ({st['state']})")
        return 0
    job.stop_file.touch()
    final = wait_terminal(job, args.timeout)
    if final.get("state") not in jobs.TERMINAL:
        pid = final.get("driver_pid")
        if jobs.pid_alive(pid):
            log.warning("job did not stop within %.0f s; terminating driver %s", args.timeout, pid)
            os.kill(pid, signal.SIGTERM)
            final = wait_terminal(job, 60)
    print(f"job {job.name}: {final.get('state')} at step {jobs.status(job)['step']}")
    return 0 if final.get("state") in jobs.TERMINAL else 1


def cmd_data(args) -> int:
    from data_pipeline import DataError, default_shards_dir, prepare

    _setup_logging(args.debug)
    out = Path(args.out) if args.out else default_shards_dir(args.corpus, args.vocab_size, args.seq_len)
    try:
        m = prepare(args.corpus, out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                    tokenizer=Path(args.tokenizer) if args.tokenizer else None, samples_per_shard=args.samples_per_shard)
    except DataError as e:
        raise UserError(f"data prepare: {e}") from None
    print(f"prepared {out}: {m.train.samples} train / {m.val.samples} val samples of {m.seq_len + 1} tokens, vocab {m.vocab_size}")
    return 0


def _quiet_deepspeed() -> None:
    """DeepSpeed logs to stdout (its accelerator warning at import): commands that print JSON keep it pure."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: False)


def cmd_eval(args) -> int:
    from launcher.evaluate import evaluate

    _setup_logging(args.debug)
    _quiet_deepspeed()  # imported to recognise a pipeline engine
    if args.tasks is None:
        print(json.dumps(evaluate(args.target, max_samples=args.samples), indent=1))
        return 0
    from launcher.eval_tasks import parse_tasks
    from launcher.evaluate import run_tasks

    tasks = parse_tasks(args.tasks)  # unknown names refused before the checkpoint is read
    result = run_tasks(args.target, tasks, samples=args.samples, blimp_dir=args.blimp_dir,
                       blimp_pairs=args.blimp_pairs, log=not args.no_log)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_tasks(result)
    return 0


def _print_tasks(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "metric", "value", title=f"{result['checkpoint']} (step {result['step']})")
    for task, metrics in result["tasks"].items():
        for key, value in metrics.items():
            table.add_row(task, key, f"{value:.4f}")
    Console().print(table)


def cmd_export(args) -> int:
    from launcher.export import export

    _setup_logging(args.debug)
    _quiet_deepspeed()
    print(json.dumps(export(args.target, args.fmt, args.out), indent=1))
    return 0


def cmd_generate(args) -> int:
    from launcher.generate import run_generate

    _setup_logging(args.debug)
    _quiet_deepspeed()
    result = run_generate(args.target, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        rate = f"{result['tokens_per_s']:.1f} tokens/s" if result["tokens_per_s"] else "no tokens"
        print(f"{args.prompt}{result['text']}\n\n[{len(result['tokens'])} new tokens, {rate}, step {result['step']}]")
    return 0


def _load_for_plan(config: str, sets: list[str]):
    """Validate as `submit` does, except for what planning explores: layout degrees jobs do not run
    yet (`validate.NOT_YET`) and a cuda device this machine lacks. The real degrees still go
    through `data_parallel_size`, so dp and the global-batch arithmetic are the job's."""
    import copy

    from launcher.spec import load_spec
    from launcher.validate import NOT_YET, data_parallel_size, validate

    spec = load_spec(config, sets)
    check = copy.deepcopy(spec)
    p = check.parallel
    degrees = [p.tp, p.pp, p.cp, p.ep, p.dp or 1, check.cluster.workers]
    if all(isinstance(v, int) and v >= 1 for v in degrees):  # else validate names the bad key first
        dp = data_parallel_size(spec)
        for key in NOT_YET:
            section, name = key.split(".")
            setattr(getattr(check, section), name, 1)
        if "parallel.tp" in NOT_YET:
            p.sequence_parallel = False
        p.dp, check.cluster.workers = None, dp * p.tp * p.pp * p.cp
    if check.cluster.device == "cuda":
        check.cluster.device = "cpu"
    validate(check)
    return spec


def cmd_plan(args) -> int:
    import torch

    from launcher.validate import make_spec_plan

    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    spec = _load_for_plan(args.config, args.sets + ([f"cluster.workers={args.world}"] if args.world is not None else []))
    # "auto" is what a job started from this machine would pick; --set cluster.device=cuda plans a GPU job anywhere.
    cuda = spec.cluster.device == "cuda" or (spec.cluster.device == "auto" and torch.cuda.is_available())
    _quiet_deepspeed()  # imported for the pipeline's stage bounds
    plan = make_spec_plan(spec, cuda, peak_tflops=args.peak_tflops, mfu=args.mfu)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        _print_plan(spec, plan)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_plan(spec, plan) -> None:  # noqa: ANN001
    from rich.console import Console
    from rich.table import Table

    lay, w = plan.layout, plan.workload
    # One column per stage: a row per quantity stays readable at any pp (wider than the terminal if need be).
    console = Console(width=max(Console().width, 36 + 14 * len(plan.stages)))
    console.print(f"{spec.model.arch} {spec.model.preset}: {plan.params_total:,} parameters")
    console.print(f"{plan.flops_per_token:.3g} FLOPs/token, {plan.flops_per_step:.3g} FLOPs/step "
                  f"({plan.tokens_per_step:,} tokens)")
    console.print(f"world {lay['world']} = pp {lay['pp']} × dp {lay['dp']} × cp {lay['cp']} × tp {lay['tp']}"
                  f"{' with sequence parallel' if lay['sequence_parallel'] else ''}, ZeRO {lay['zero']}, {w['dtype']}")
    console.print(f"micro-batch {w['micro_batch']} × seq {w['seq_len']}, grad-accum {w['grad_accum']}, "
                  f"global batch {w['global_batch']}")
    mark = {True: " *", False: ""}
    ckpt = spec.train.activation_checkpointing
    size = _size
    rows = [
        ("ranks", lambda s: f"{s.ranks[0]}-{s.ranks[1]}"), ("blocks / layers", lambda s: f"{s.blocks[0]}-{s.blocks[1] - 1} / {s.layers}"),
        ("params", lambda s: f"{s.params:,}"), ("weights", lambda s: size(s.weights_bytes)),
        ("grads", lambda s: size(s.grads_bytes)), ("optimizer", lambda s: size(s.optimizer_bytes)),
        ("micro-batches in flight", lambda s: str(s.in_flight_microbatches)),
        ("activations", lambda s: size(s.activations_bytes)),
        ("activations ckpt", lambda s: size(s.activations_checkpointed_bytes)),
        ("total" + mark[not ckpt], lambda s: size(s.total_bytes)),
        ("total ckpt" + mark[ckpt], lambda s: size(s.total_checkpointed_bytes)),
        ("GFLOP/token", lambda s: f"{s.flops_per_token / 1e9:.3g}"), ("TFLOP/step", lambda s: f"{s.flops_per_step / 1e12:.3g}"),
    ]
    table = Table("per rank", *(f"stage {s.stage}" for s in plan.stages))
    for name, cell in rows:
        table.add_row(name, *(cell(s) for s in plan.stages))
    console.print(table)
    console.print(f"* what this spec runs (train.activation_checkpointing: {str(ckpt).lower()})")
    console.print("activations: Korthikanti et al. 2022, an upper bound with fused attention; DeepSpeed's transient "
                  "buffers are not counted")
    if plan.step_time_s:
        console.print(f"predicted step {plan.step_time_s:.3g} s, {plan.tokens_per_s:,.0f} tokens/s "
                      f"({plan.peak_tflops:g} TFLOP/s peak per rank, MFU {plan.mfu:g}, 1F1B bubble included)")


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """The error types whose message is the whole story (they name the key, shard or file). Looked up among
    the modules already imported: an error of one was raised by it, and `status` stays free of torch."""
    found: list[type[BaseException]] = [UserError]
    for module, name in (("data_pipeline.errors", "DataError"), ("parallel.safe_load", "UnsafeFileError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


VERBS = {"submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "resume": cmd_resume,
         "data": cmd_data, "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate, "plan": cmd_plan, "_run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.debug = args.debug or bool(os.environ.get("LMFORGE_DEBUG"))
    try:
        return VERBS[args.verb](args)
    except Exception as e:
        if args.debug or not isinstance(e, _one_line_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
