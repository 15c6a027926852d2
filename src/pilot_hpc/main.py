"""Entry point: `[mpiexec -n W] python -m pilot_hpc.main --config FILE [section.key=value ...]`.

Exit codes: 0 done; 2 bad input (config, data records, images, a resume refused, an
output folder in use by another job or not writable), reported before any rank trains;
75 preempted (SIGTERM/SIGUSR2/SIGINT: every rank stopped at its next local step and a
checkpoint was written; rerun the same command to resume); 1 a failure while running:
a round in which no client produced a finite update (every rank stops after the round's
stop vote, no checkpoint is written for that round), or an error on one rank (the whole
MPI job is ended through MPI_Abort so that no rank is left waiting in a collective);
130 a second Ctrl-C (aborted at once, no checkpoint).

Bad input is a pilot_hpc.errors.BadInput (ConfigError, DataError, CheckpointError,
ExportError) or an OSError on a file or folder the user named: caught where it is met,
printed as one line by `fatal`, exit 2. Any other exception, a ValueError included, is a
bug: a traceback, exit 1, MPI_Abort.

Startup order: the config is parsed and checked first, with only the standard library
and PyYAML loaded, so that a typo costs 0.2-0.3 s (1.1 s under `mpiexec -n 9`, measured
on the 2-core test machine at load ~6) instead of the 13 s (68 s) it took when torch,
transformers and MPI loaded first; only then MPI starts, rank 0 locks the output folder,
and the heavy stack loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback

from pilot_hpc import cpumath, runlock
from pilot_hpc.errors import BadInput, ConfigError

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again (resumes from the checkpoint just written)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C, no checkpoint
# A Ctrl-C in a terminal can reach a rank twice within milliseconds (from the terminal's
# process group and forwarded by mpiexec): a second SIGINT counts only after this long.
SIGINT_REPEAT_S = 1.0
# Environment variables that carry the rank before MPI starts (MPICH/PMI, PMIx,
# Open MPI, Slurm), so that only rank 0 prints a config error found before MPI_Init.
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")

log = logging.getLogger("pilot_hpc")


def fatal(kind: str, message: str) -> None:
    """The one line of an error that ends the run: `pilot_hpc: <kind>: <message>` on
    stderr; kind is "config error", "error" or where it happened ("rank R, client K")."""
    print(f"pilot_hpc: {kind}: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pilot_hpc.main", description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", default=None,
                    help="YAML config (an overlay on the built-in defaults); repeat it to stack files, a later "
                         "file's keys winning (e.g. a paper config, then prepare's overlay.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. fl.rounds=2 run.output_dir=runs/x")
    return ap.parse_args(argv)


def setup_logging(rank: int) -> None:
    fmt = "%(asctime)s [pilot_hpc] %(message)s" if rank == 0 else f"%(asctime)s [pilot_hpc rank {rank}] %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S",
                        stream=sys.stdout)
    # Library chatter (weight-loading bars, generation notices) buries the round lines.
    import datasets
    import transformers

    from pilot_hpc.model.build import quiet_checkpointing_deprecation

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    quiet_checkpointing_deprecation()


def env_rank() -> int:
    """This process's rank as the launcher told it, without starting MPI (0 when alone)."""
    for var in RANK_VARIABLES:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


# What from_pretrained needs in a local LLaVA folder: any one name of each group.
# transformers 5's processor save_pretrained writes the image processor's settings into
# processor_config.json and no preprocessor_config.json; AutoImageProcessor reads either.
MODEL_FILES = {"config.json": ("config.json",),
               "a tokenizer": ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"),
               "an image preprocessor": ("preprocessor_config.json", "processor_config.json")}


def check_paths(cfg) -> None:
    """Filesystem checks of the config (cheap, before anything loads): a missing model
    folder would otherwise reach Hugging Face's "Repo id must be in the form..."."""
    path = cfg.model.path
    if not path:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"model.path {path!r} is not a folder: it must be a local Hugging Face LLaVA folder "
                          "holding config.json, the tokenizer (tokenizer.json or tokenizer.model) and "
                          "preprocessor_config.json or processor_config.json (e.g. a download of "
                          "llava-hf/llava-1.5-7b-hf)")
    missing = [what for what, names in MODEL_FILES.items()
               if not any(os.path.isfile(os.path.join(path, n)) for n in names)]
    if missing:
        raise ConfigError(f"model.path {path!r} lacks {', '.join(missing)}: a Hugging Face LLaVA folder holds "
                          "config.json, the tokenizer (tokenizer.json or tokenizer.model) and the image processor's "
                          "preprocessor_config.json (or processor_config.json, as transformers 5 saves it)")


def check_device(cfg) -> None:
    if cfg.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("run.device=cuda but no CUDA device is visible on "
                              f"{os.uname().nodename}; use run.device=cpu or run.device=auto")


def check_writable(cfg, state: dict, num_clients: int) -> bool:
    """Rank 0, before round 0: the output and checkpoint folders take a file, and the
    disk has room for one checkpoint. Prints the problem; False means exit 2."""
    from pilot_hpc.checkpoint.resume import folder_of

    # A mid-round file holds each client's state, its pre-round state and the AdamW
    # moments of the same tensors: about 4x the clients' personal-state bytes.
    need = 4 * num_clients * sum(t.numel() * t.element_size() for t in state.values())
    for folder in (cfg.run.output_dir, folder_of(cfg)):
        probe = os.path.join(folder, f".write_probe.{os.getpid()}")
        created = not os.path.lexists(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
            os.remove(probe)
            st = os.statvfs(folder)
            if created:  # leave nothing behind if another rank's data stops the job
                os.rmdir(folder)
        except OSError as err:
            fatal("error", f"{folder} cannot be written ({err.strerror or err}); checkpoints go to "
                           f"{folder_of(cfg)}: fix its permissions or set another run.output_dir")
            return False
        free = st.f_bavail * st.f_frsize
        if free < need:
            fatal("error", f"{folder} has {free / 2**20:.1f} MiB free but one checkpoint needs about "
                           f"{need / 2**20:.1f} MiB: free space or set another run.output_dir")
            return False
    return True


def resolve_device(cfg, rank: int):
    import torch

    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():  # check_device has refused this already, on every rank
            raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def data_files(cfg, comm):
    """(train files, eval files, image root or None, base model folder), or None after
    every rank learnt that rank 0 could not build the caches (it printed why)."""
    from pilot_hpc.data import synthetic
    from pilot_hpc.train.warm_start import base_folder, ensure_base

    if cfg.data.kind == "llava_json":
        return cfg.data.train_files, cfg.data.eval_files, cfg.data.image_root or None, cfg.model.path
    spec = synthetic.spec_for(cfg)
    folder = synthetic.folder_for(spec, cfg.run.cache_dir)
    base = cfg.model.path
    ok = True
    if comm.rank == 0:  # one writer; the others wait politely below
        try:
            log.info("synthetic FedMIT data: %s", folder)
            synthetic.ensure(spec, cfg.run.cache_dir)
            base = base or ensure_base(cfg, folder, spec.key())
        except (BadInput, OSError) as err:  # OSError: run.cache_dir not writable, or full
            fatal("error", f"preparing the synthetic data or the base model in {cfg.run.cache_dir} failed: {err}")
            ok = False
    if not comm.all_ok(ok):
        return None
    base = base or base_folder(cfg, spec.key())
    train, evals = synthetic.client_files(folder, cfg.fl.num_clients)
    return train, evals, None, base


def write_traffic(cfg, comm) -> None:
    """<output_dir>/traffic/rank_RRR.json: every collective this rank took part in, in bytes."""
    import dataclasses

    from pilot_hpc import jsonout

    folder = os.path.join(cfg.run.output_dir, "traffic")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank_{comm.rank:03d}.json"), "w") as fh:
        jsonout.dump([dataclasses.asdict(t) for t in comm.traffic], fh)


def run(cfg, comm) -> int:
    """One federation after the checks: place the clients, load them, find where to
    start, run the rounds. Returns the exit code (the same on every rank)."""
    import torch

    from pilot_hpc.fl.federation import Federation
    from pilot_hpc.fl.strategies import get_strategy
    from pilot_hpc.fl.coded import exchange_for
    from pilot_hpc.fl.transforms import chain_for

    torch.set_num_threads(cfg.run.threads_per_rank)
    device = resolve_device(cfg, comm.rank)
    strategy = get_strategy(cfg.fl.strategy, cfg)
    if cfg.privacy.where != "none":
        from pilot_hpc.fl.privacy import startup_line

        log.info("%s", startup_line(cfg))
    fed_comm, group, mine = place_clients(cfg, comm, device)
    loaded = load_clients(cfg, comm, strategy, mine, device)
    if loaded is None:
        return EXIT_BAD_INPUT
    pm, initial, slots = loaded
    warn_if_too_big(cfg, comm, device)
    if strategy.aggregator is not None:
        strategy.aggregator.attach(pm)
    fed = Federation(cfg, fed_comm, pm, strategy, slots, device, world=comm, group=group)
    if strategy.communicates and fed_comm is not None:
        if cfg.privacy.secure_aggregation:
            from pilot_hpc.fl.secagg import SecureSumExchange

            fed.exchanger = SecureSumExchange(fed_comm, fed.blocks, device, cfg.fl.chunk_mb, seed=cfg.run.seed)
        else:
            fed.exchanger = exchange_for(cfg, fed_comm, fed.blocks, device)
        fed.transforms = chain_for(cfg)
    ok, start = find_start(cfg, comm, fed, initial)
    if not ok:
        return EXIT_BAD_INPUT
    return federate(cfg, comm, fed, start)


def place_clients(cfg, comm, device):
    """(the federation's communicator, this rank's client group or None, its clients)."""
    from pilot_hpc.fl.comm import block_ranges

    per = cfg.run.ranks_per_client
    # Client groups: ranks r*per .. r*per + per - 1 host the same clients (data-parallel
    # inside each client); their first rank is the group's leader in the federation.
    fed_comm, group = comm.split_clients(per) if per > 1 else (comm, None)
    mine = list(block_ranges(cfg.fl.num_clients, comm.size // per)[comm.rank // per])
    log.info("%d clients on %d rank(s) (%d rank(s) per client), strategy %s, engine %s, device %s, output %s",
             cfg.fl.num_clients, comm.size, per, cfg.fl.strategy, cfg.train.engine, device, cfg.run.output_dir)
    math = cpumath.describe()
    log.info("CPU math: torch kernels %s, MKL_CBWR=%s, ONEDNN_MAX_CPU_ISA=%s (%s=%s; 'native' uses this CPU's "
             "fastest paths, numbers then tied to the CPU model)", math["torch_cpu_capability"], math["MKL_CBWR"] or "-",
             math["ONEDNN_MAX_CPU_ISA"] or "-", cpumath.SWITCH, math[cpumath.SWITCH])
    return fed_comm, group, mine


def load_clients(cfg, comm, strategy, mine: list[int], device):
    """Every rank builds its model and loads and checks its own clients' data; all ranks
    then agree to go on or to stop, so that a bad record ends the job before anyone
    trains. (model, its initial state, this rank's ClientSlots), or None: exit 2."""
    files = data_files(cfg, comm)
    if files is None:
        return None
    train_files, eval_files, image_root, base = files
    ok = True
    try:
        pm, initial = build_model(cfg, strategy, base, device, comm.rank)
        states = None
        if cfg.fl.client_state == "disk":  # the clients' states in files (fl/client_store.py)
            from pilot_hpc.fl.client_store import StateFiles

            states = StateFiles(cfg.run.output_dir, comm.rank, initial)
        slots = [client_slot(cfg, k, pm, initial, train_files[k], eval_files[k], image_root, states) for k in mine]
    except (BadInput, OSError) as err:  # OSError: a data file or image that cannot be opened
        fatal("error", f"rank {comm.rank} (clients {mine}): {err}")
        ok = False
    ok = ok and (comm.rank != 0 or check_writable(cfg, initial, cfg.fl.num_clients))
    if not comm.all_ok(ok):
        return None
    return pm, initial, slots


def build_model(cfg, strategy, base: str, device, rank: int):
    """(the rank's shared model, prepared for the strategy; its initial state)."""
    from pilot_hpc import faults
    from pilot_hpc.model.build import build_pilot_model

    pm = build_pilot_model(base, cfg.model, len(cfg.tasks), 0, seed=cfg.run.seed, device=device, pilot=cfg.pilot)
    if faults.hit("raise_build", rank=rank):
        raise ValueError(f"injected failure (PILOT_HPC_INJECT) in the model build on rank {rank}")
    strategy.policy.prepare_model(pm)
    return pm, pm.get_state()


def client_slot(cfg, k: int, pm, initial: dict, train_file: str, eval_file: str, image_root: str | None,
                states=None):
    """Client k with its two splits loaded and checked, holding the initial state (in
    memory, or in the rank's state files `states` under fl.client_state=disk)."""
    from pilot_hpc.data.records import InstructionDataset, load_records
    from pilot_hpc.fl.client import ClientSlot

    cache = os.path.join(os.path.expanduser(cfg.run.cache_dir), "hf_datasets")
    task = cfg.fl.client_tasks[k]
    train, evals = [InstructionDataset(load_records(path, image_root, cache), pm.tokenizer, pm.image_processor,
                                       pm.num_image_tokens, cfg.data.max_length, cache_pixels=cfg.data.cache_images,
                                       image_aspect_ratio=cfg.data.image_aspect_ratio, **pm.dataset_options())
                    for path in (train_file, eval_file)]
    # Over-long samples and undecodable images surface now (data.verify_images). The
    # evaluation split's images are always decoded now (a few thousand per client at
    # most, cached nowhere): a bad one met at evaluation would cost the round just
    # trained, at every rerun.
    for i in range(len(train)) if cfg.data.verify_images else ():
        train.check(i)
    for i in range(len(evals)):
        evals.check(i, full=cfg.data.verify_images)
    if states is not None:
        from pilot_hpc.fl.client_store import DiskClientSlot

        return DiskClientSlot(k, task, cfg.tasks.index(task), train, evals, initial, files=states)
    return ClientSlot(k, task, cfg.tasks.index(task), train, evals, dict(initial))


def warn_if_too_big(cfg, comm, device) -> None:
    """On CUDA, before anyone trains: an out-of-memory error mid-round costs the round."""
    if device.type != "cuda":
        return
    from pilot_hpc.memory import cuda_warning

    warning = cuda_warning(cfg, device)
    if warning:
        log.warning("rank %d: %s", comm.rank, warning)


def find_start(cfg, comm, fed, initial: dict):
    """(ok, the resume point or None to start over), the same on every rank; not ok: a
    refused resume, exit 2 (rank 0 printed why)."""
    ok, start = True, None
    try:
        start = fed.locate({k: tuple(v.shape) for k, v in initial.items()})
    except BadInput as err:  # a refused resume or server state: every leader raises it alike
        if comm.rank == 0:
            fatal("config error", str(err))
        ok = False
    # The members of a client group do not locate: they learn the verdict in this vote.
    if cfg.run.ranks_per_client > 1 and not comm.all_ok(ok):
        return False, None
    if not ok:
        return False, None
    return True, fed.share_start(start)


def federate(cfg, comm, fed, start) -> int:
    """The rounds from `start`, then the run's outputs; the exit code."""
    from pilot_hpc import report
    from pilot_hpc.fl.stops import BadSampleStop, NoFiniteUpdate, Preempted

    if comm.rank == 0:  # one event file per run, written by rank 0 (pilot_hpc.tensorboard)
        from pilot_hpc.tensorboard import open_board

        fed.board = open_board(cfg)
    try:
        history = fed.run(start)
    except BadSampleStop as stop:  # data.on_bad_sample=fail: bad input, with the round kept
        write_traffic(cfg, comm)
        comm.close()
        if stop.sample is not None:
            fatal("error", f"rank {comm.rank}: unreadable sample (data.on_bad_sample=fail): {stop.sample}")
        if comm.rank == 0:
            fatal("error", f"the round so far is in checkpoint {stop.path}: fix the sample and rerun the same "
                           "command to resume there (or set data.on_bad_sample=skip)")
        return EXIT_BAD_INPUT
    except Preempted as stop:
        write_traffic(cfg, comm)
        comm.close()
        if comm.rank == 0:
            log.info("%s (exit code %d)", stop, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except NoFiniteUpdate as err:  # every rank raised it after the same vote: no one is left waiting
        write_traffic(cfg, comm)
        comm.close()
        if comm.rank == 0:
            fatal("error", str(err))
        return EXIT_FAILURE
    finally:
        if fed.board is not None:
            fed.board.close()
    write_traffic(cfg, comm)
    if comm.rank == 0:
        paths = report.write_outputs(history, cfg)
        print("\n" + report.results_table(history) + "\n", flush=True)
        log.info("wrote %s, %s, %s", paths["metrics"], paths["results"], paths["plot"])
    comm.barrier()
    comm.close()
    return 0


def check_slurm_world(world: int) -> None:
    """Under srun, the MPI world must span the step's tasks: a wrong PMI plugin starts
    N one-rank worlds that would each run the whole federation."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if tasks is not None and tasks.isdigit() and int(tasks) != world:
        raise ConfigError(f"the MPI world has {world} rank(s) but this Slurm step started {tasks} tasks: "
                          "launch with `srun --mpi=pmi2` (see README, Troubleshooting)")


def first_checks(args) -> "object | int":
    """The config, parsed and checked with only the standard library and PyYAML loaded
    (no torch, no MPI): the Config, or EXIT_BAD_INPUT after one message from rank 0."""
    from pilot_hpc.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg)
    except ConfigError as err:  # every rank sees the same error: rank 0 says it once
        if env_rank() == 0:
            fatal("config error", str(err))
        return EXIT_BAD_INPUT
    return cfg


def check_pooled(cfg, world: int) -> None:
    from pilot_hpc.fl import privacy
    from pilot_hpc.fl.strategies import get_strategy
    from pilot_hpc.fl.transforms import chain_for

    privacy.check(cfg)  # privacy.target_epsilon can be reached (solved once here, cached)
    chain = chain_for(cfg)  # every transform named in fl.transforms is registered
    if cfg.privacy.secure_aggregation:
        from pilot_hpc.fl.secagg import check_chain

        check_chain(chain)
    if get_strategy(cfg.fl.strategy, cfg).pooled and world > 1:
        raise ConfigError(f"fl.strategy={cfg.fl.strategy} trains one model on all clients' data in one "
                          f"process: run it without mpiexec (or with -n 1), not with {world} ranks")


def same_everywhere(comm, checks) -> bool:
    """Checks that depend only on the config and the world size, so every rank reaches
    the same verdict without a collective: rank 0 prints the one message."""
    try:
        for check in checks:
            check()
    except ConfigError as err:
        if comm.rank == 0:
            fatal("config error", str(err))
        return False
    return True


def take_folder(cfg, comm):
    """Rank 0 locks run.output_dir before anything else is written there, while every rank
    checks its device (a node may lack the GPU); all learn the verdict in one collective:
    (ok, the lock on rank 0 or None). The lock lives as long as this process: the kernel
    releases it at exit."""
    lock, ok = None, True
    try:
        check_device(cfg)  # imports torch only for run.device=cuda
        device_problem = None
    except ConfigError as err:
        device_problem, ok = err, False
    if comm.rank == 0 and ok:
        try:
            lock = runlock.RunLock(cfg.run.output_dir).acquire()
            removed = lock.clean_previous()
            if removed:
                print(f"pilot_hpc: removed MPICH shared memory left by this folder's previous (aborted) job: "
                      f"{', '.join(removed)}", file=sys.stderr, flush=True)
            lock.record_segments(runlock.own_segments())
        except runlock.FolderBusy as err:
            fatal("error", str(err))
            ok = False
        except OSError as err:
            fatal("error", f"run.output_dir {cfg.run.output_dir} cannot be written ({err.strerror or err}): "
                           "fix its permissions or set another run.output_dir")
            ok = False
    if comm.all_ok(ok):
        return True, lock
    if device_problem is not None or comm.rank == 0:
        # One message: rank 0's when it has a device problem, else every rank's that has one
        # (a second collective, on this failure path only, tells them which case it is).
        root_device_ok = comm.all_ok(comm.rank != 0 or device_problem is None)
        if device_problem is not None and (comm.rank == 0 or root_device_ok):
            where = "" if comm.rank == 0 else f"rank {comm.rank}: "
            fatal("config error", f"{where}{device_problem}")
    else:
        comm.all_ok(True)
    return False, lock


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = first_checks(args)
    if isinstance(cfg, int):
        return cfg
    from pilot_hpc.fl.comm import Comm

    comm = Comm()

    def abort_on_exception(kind, value, tb):
        # An uncaught error on one rank must end the whole job, not leave the others
        # waiting in a collective forever.
        from pilot_hpc.fl.client import hosted_client

        traceback.print_exception(kind, value, tb)
        client = hosted_client()
        where = f"rank {comm.rank}" + (f", client {client}" if client is not None else "")
        fatal(where, f"{kind.__name__}: {value}; aborting the MPI job")
        if comm.size > 1:
            # MPI_Abort leaves the node's MPICH segment in /dev/shm: unlink this job's own
            # (the other ranks keep their mappings until they are killed).
            runlock.remove_segments(runlock.own_segments())
            comm.abort(EXIT_FAILURE)

    sys.excepthook = abort_on_exception
    first_sigint = []

    def on_signal(signum, frame):
        # Only a flag here: the training loop notices it at the next step, tells the
        # other ranks, and all of them checkpoint together. Ctrl-C is treated like
        # SIGTERM; a second Ctrl-C (after SIGINT_REPEAT_S) aborts without a checkpoint.
        if signum == signal.SIGINT:
            now = time.monotonic()
            if first_sigint and now - first_sigint[0] > SIGINT_REPEAT_S:
                # os.write, not print: the handler may run while the main thread is inside a
                # write to sys.stderr (a reentrant buffered write raises instead of printing).
                os.write(2, f"pilot_hpc: rank {comm.rank}: second SIGINT: aborting now, without a "
                            "checkpoint\n".encode())
                runlock.remove_segments(runlock.own_segments())
                if comm.size > 1:
                    comm.abort(EXIT_INTERRUPTED)
                os._exit(EXIT_INTERRUPTED)
            if first_sigint:
                return  # the same Ctrl-C delivered twice
            first_sigint.append(now)
        comm.request_stop()
        os.write(2, f"pilot_hpc: rank {comm.rank}: got {signal.Signals(signum).name}; checkpointing at the next "
                    "local step\n".encode())

    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, on_signal)
    from pilot_hpc.config import check_world

    # Cheap checks, then the folder's lock (before torch and transformers load, so that a
    # second job in the folder is told in about two seconds), then the checks needing torch.
    # One collective in all (the lock's verdict): the others reach the same verdict on
    # every rank by themselves.
    ok = same_everywhere(comm, [lambda: check_world(cfg, comm.size), lambda: check_slurm_world(comm.size)])
    if ok:
        ok, lock = take_folder(cfg, comm)  # noqa: F841 - held (by rank 0) until the process exits
    if not ok or not same_everywhere(comm, [lambda: check_pooled(cfg, comm.size)]):
        comm.close()  # no stop request left pending in MPI (UCX warns about it at exit)
        return EXIT_BAD_INPUT
    setup_logging(comm.rank)
    return run(cfg, comm)


if __name__ == "__main__":
    sys.exit(cli())
