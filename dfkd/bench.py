"""Side-by-side benchmark harness: the same teacher, student and budget for every method, one run.

Rows: teacher, noise-KD floor, each data-free method, real-data-KD ceiling. Writes a JSON file and a
Markdown table with the hardware, wall times, seeds and the exact command.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json

KIND = {"noise": "floor (not data-free)", "real": "ceiling (uses real train images)"}


def hardware_line(hw: dict[str, Any]) -> str:
    """The results files' hardware line: device, cores, torch and threads, platform, and the machine's load
    when the figures were taken (wall-clock figures depend on it)."""
    load = hw.get("load_average_1_5_15min")
    return (f"- hardware: {hw.get('gpu') or 'CPU'}, {hw['cpu_count']} cores, torch {hw['torch']} "
            f"({hw['cpu_threads']} threads), {hw['platform']}"
            + (f"; load average {load[0]:g} / {load[1]:g} / {load[2]:g} (1 / 5 / 15 min) at the end" if load else ""))


def compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose as _compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dfkd.cli.common import config_dir
    from dfkd.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides))


def prepare_teacher(config_name: str, overrides: Sequence[str], train_split: bool = True) -> dict[str, Any]:
    """Compose the config, set up the runtime, build (train or load) the teacher and score it once.
    Every benchmark row then finds the teacher cached."""
    from dfkd.eval.classification import evaluate
    from dfkd.pipeline import build_teacher, load_data, setup_runtime

    cfg = compose(config_name, overrides)
    device = setup_runtime(cfg)
    data = load_data(cfg.data, train=train_split)
    t0 = time.perf_counter()
    teacher = build_teacher(cfg.teacher, data, device, seed=int(cfg.seed), progress=False)
    seconds = time.perf_counter() - t0
    top1 = evaluate(teacher, data.test, device=device)["top1"]
    print(f"teacher top-1 {top1:.4f} ({seconds:.0f} s)", flush=True)
    return {"cfg": cfg, "device": device, "data": data, "teacher": teacher, "teacher_top1": top1,
            "teacher_seconds": seconds}


def run_methods(methods: Sequence[str], common: Sequence[str], per_method: dict[str, Sequence[str]],
                seeds: Sequence[int], out_dir: Path, options: dict[str, str] | None = None,
                seeds_for: dict[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """Run every method (a ``synthesizer`` config option; ``options`` maps a method to another
    option of the group, e.g. a dataset-specific variant) for every seed (``seeds_for`` gives a method
    its own seeds, e.g. one seed for the floor and the ceiling beside three for the headline)."""
    from dfkd.pipeline import run_distill

    rows = []
    for method in methods:
        for seed in (seeds_for or {}).get(method, seeds):
            option = (options or {}).get(method, method)
            overrides = [f"synthesizer={option}", f"seed={seed}", "progress=false", "resume=false",
                         *common, *per_method.get(method, [])]
            cfg = compose("distill", overrides)
            run_dir = out_dir / "runs" / f"{method}_seed{seed}"
            t0 = time.perf_counter()
            summary = run_distill(cfg, run_dir)
            summary["method"] = method
            summary["overrides"] = overrides
            summary["process_seconds"] = time.perf_counter() - t0
            summary["run_dir"] = str(run_dir)
            rows.append(summary)
            print(f"{method:>14} seed {seed}: student top-1 {summary['student_top1']:.4f} "
                  f"({summary['distill_seconds']:.0f} s)", flush=True)
    return rows


def parse_seeds_for(items: Sequence[str], known: Sequence[str], prog: str) -> dict[str, list[int]]:
    """``--seeds-for ROW=S[,S...]`` items -> {row: seeds}; a malformed item or an unknown row exits with one
    line naming the program."""
    seeds_for: dict[str, list[int]] = {}
    for item in items:
        row, _, seeds = item.partition("=")
        try:
            seeds_for[row] = [int(x) for x in seeds.split(",")]
        except ValueError:
            sys.exit(f"{prog}: error: --seeds-for wants ROW=S[,S...], got {item!r}")
        if row not in known:
            sys.exit(f"{prog}: error: --seeds-for names {row!r}, which is not among the rows run")
    return seeds_for


def same_settings(old: dict, new: dict) -> bool:
    """A stored run's config (``config.json``) equals the config a row would run now. A setting added to the
    code after the stored run counts as equal when the row leaves it at the value that reproduces the old
    behaviour (``student.init=scratch``, ``distill.ema=0``; a synthesizer argument at its default)."""
    import inspect

    from generators.base import SYNTHESIZERS

    old, new = dict(old), dict(new)
    for group, key, default in (("student", "init", "scratch"), ("distill", "ema", 0.0)):
        if key not in old.get(group, {}) and new.get(group, {}).get(key) == default:
            new[group] = {k: v for k, v in new[group].items() if k != key}
    so, sn = dict(old.pop("synthesizer", {})), dict(new.pop("synthesizer", {}))
    if old != new or so.get("name") != sn.get("name"):
        return False
    if sn.get("name"):
        params = inspect.signature(SYNTHESIZERS.get(sn["name"]).__init__).parameters
        for k in set(sn) - set(so):
            if k not in params or sn[k] != params[k].default:
                return False
    return all(so[k] == sn.get(k) for k in so)


def stored_run(run_dir: Path, overrides: Sequence[str]) -> dict[str, Any] | None:
    """The summary of a finished run in ``run_dir`` made with the config ``overrides`` compose to now, or None
    (no finished run there, or one made with other settings). Lets a table be measured in more than one
    sitting, or by two processes side by side, and assembled at the end."""
    from dfkd.pipeline import _plain

    f, cfg_file = Path(run_dir) / "summary.json", Path(run_dir) / "config.json"
    if not (f.is_file() and cfg_file.is_file()):
        return None
    if not same_settings(json.loads(cfg_file.read_text()), _plain(compose("distill", overrides))):
        return None
    summary = json.loads(f.read_text())
    summary.update(overrides=list(overrides), run_dir=str(run_dir), reused=True)
    return summary


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        accs = [r["student_top1"] for r in rs]
        ips = [r["synth_images_per_second"] for r in rs if r.get("synth_images_per_second")]
        out.append({
            "method": method,
            "kind": KIND.get(method, "data-free"),
            "student_top1_mean": statistics.mean(accs),
            "student_top1_std": statistics.pstdev(accs) if len(accs) > 1 else None,
            "student_top1_per_seed": accs,
            "distill_seconds_mean": statistics.mean(r["distill_seconds"] for r in rs),
            "synth_images_per_second": statistics.mean(ips) if ips else None,
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0) for r in rs) or None,
        })
    return out


def redact_paths(obj: Any, extra: Optional[Mapping[Any, str]] = None) -> Any:
    """Replace this machine's data folder (DFKD_DATA) and home folder in results with placeholders,
    so results files can be shared; ``extra`` maps further folders (a run's work folder, say) to the
    placeholder that names them (``{work: "$WORK"}``), replaced first."""
    import os

    import tempfile

    cwd = Path.cwd()
    subs = [(os.environ.get("DFKD_DATA"), "$DFKD_DATA"), (str(cwd) + os.sep if cwd.parent != cwd else None, ""),
            (tempfile.gettempdir(), "$TMPDIR"), (str(Path.home()), "~")]
    subs = [(str(Path(a).resolve()) + (os.sep if a.endswith(os.sep) else "") if a else None, b)
            for a, b in subs] + subs
    subs = [(str(a), b) for a, b in (extra or {}).items() if a] + subs
    return _redact(obj, subs)


def _redact(obj: Any, subs: list) -> Any:
    if isinstance(obj, str):
        for a, b in subs:
            if a and a not in ("/", ".") and a in obj:
                obj = obj.replace(a, b)
        return obj
    if isinstance(obj, dict):
        return {k: _redact(v, subs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact(v, subs) for v in obj]
    return obj


def write_results(name: str, title: str, out_dir: Path, rows: list[dict[str, Any]], teacher_top1: float,
                  extra: dict[str, Any], started: float) -> tuple[Path, Path]:
    from dfkd.pipeline import hardware

    rows = redact_paths(rows)
    table = aggregate(rows)
    result = {
        "benchmark": name,
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "hardware": hardware(),
        "wall_seconds": time.perf_counter() - started,
        "teacher_top1": teacher_top1,
        "seeds": sorted({r["seed"] for r in rows}),
        "rows": table,
        "runs": rows,
        **extra,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_json(jpath, result)
    hw = result["hardware"]
    lines = [
        f"# {title}",
        "",
        f"- command: `{result['command']}`",
        hardware_line(hw),
        f"- seeds: {', '.join(map(str, result['seeds']))}; total wall time {result['wall_seconds']:.0f} s",
        *(f"- {k}: {v}" for k, v in extra.items() if not isinstance(v, (dict, list))),
        "",
        "| method | kind | student top-1 | ± (seeds) | distill time (s) | synth images/s |",
        "|---|---|---|---|---|---|",
        f"| teacher | — | {teacher_top1:.4f} | | | |",
    ]
    for r in table:
        ips = f"{r['synth_images_per_second']:.0f}" if r["synth_images_per_second"] else "—"
        std = f"{r['student_top1_std']:.4f}" if r["student_top1_std"] is not None else "— (1 seed)"
        lines.append(f"| {r['method']} | {r['kind']} | {r['student_top1_mean']:.4f} | {std} "
                     f"| {r['distill_seconds_mean']:.0f} | {ips} |")
    curves = time_to_accuracy(rows)
    result["time_to_accuracy"] = curves
    atomic_write_json(jpath, result)
    png = out_dir / f"{name}_time_to_accuracy.png"
    if plot_curves(curves, png, title, teacher_top1):
        lines += ["", f"Time to accuracy: `{png.name}` (data: `time_to_accuracy` in `{jpath.name}`)."]
    atomic_write_bytes(mpath, ("\n".join(lines) + "\n").encode())
    return jpath, mpath


def time_to_accuracy(rows: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Per run: [[wall seconds, test top-1], ...] read from the run's metrics.jsonl."""
    curves = {}
    for r in rows:
        path = Path(r["run_dir"]) / "metrics.jsonl"
        if not path.is_file():
            continue
        pts = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "test/top1" in rec:
                pts.append([rec["wall"], rec["test/top1"]])
        curves[f"{r['method']} (seed {r['seed']})"] = pts
    return curves


def plot_curves(curves: dict[str, list[list[float]]], path: Path, title: str, teacher_top1: float | None,
                ylabel: str = "student top-1 (real test set)") -> bool:
    """Write a PNG of a score ([wall s, score] points per curve) against wall time; False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    import os

    os.replace(tmp, path)
    return True


def class_agreement(run_dir: Path) -> dict[str, Any]:
    """A run's requested-class agreement (``syn/teacher_acc``) and class entropy from its metrics.jsonl:
    the mean over all rounds and over the last quarter of the rounds (None for synthesizers without labels)."""
    path = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    accs = [r["syn/teacher_acc"] for r in recs if "syn/teacher_acc" in r]
    ents = [r["syn/class_entropy"] for r in recs if "syn/class_entropy" in r]
    tail = accs[-max(1, len(accs) // 4):]
    return {"agreement_mean": statistics.mean(accs) if accs else None,
            "agreement_last_quarter": statistics.mean(tail) if accs else None,
            "class_entropy_mean": statistics.mean(ents) if ents else None, "rounds": len(recs)}


def add_agreement(jpath: Path, mpath: Path) -> list[dict[str, Any]]:
    """Add each method's requested-class agreement (mean over its seeds' runs) to a results file
    written by :func:`write_results`: an ``agreement`` list in the JSON and a table in the Markdown."""
    result = json.loads(Path(jpath).read_text())
    table = []
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        per = [class_agreement(Path(r["run_dir"])) for r in result["runs"] if r["method"] == method]

        def mean(key: str):
            vals = [p[key] for p in per if p[key] is not None]
            return statistics.mean(vals) if vals else None

        table.append({"method": method, "agreement_mean": mean("agreement_mean"),
                      "agreement_last_quarter": mean("agreement_last_quarter"),
                      "class_entropy_mean": mean("class_entropy_mean"), "rounds_mean": mean("rounds")})
    result["agreement"] = table
    atomic_write_json(Path(jpath), result)
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["", "Requested-class agreement (the teacher's arg-max on the un-augmented synthetic images equals "
             "the class each was made for; chance = 1 / classes) and the class entropy of the batch-mean "
             "teacher distribution (1 = spread evenly over the classes):", "",
             "| method | agreement (run mean) | agreement (last quarter) | class entropy | rounds |",
             "|---|---|---|---|---|"]
    lines += [f"| {a['method']} | {f(a['agreement_mean'])} | {f(a['agreement_last_quarter'])} | "
              f"{f(a['class_entropy_mean'])} | {'—' if a['rounds_mean'] is None else round(a['rounds_mean'])} |"
              for a in table]
    atomic_write_bytes(Path(mpath), (Path(mpath).read_text() + "\n".join(lines) + "\n").encode())
    return table


def write_report(out_dir: str | Path, name: str, payload: dict[str, Any], md_lines: Sequence[str]) -> None:
    """``out_dir/<name>.json`` (the payload, paths redacted) and ``out_dir/<name>.md`` (the lines), written
    atomically, and the Markdown printed."""
    out = Path(out_dir)
    atomic_write_json(out / f"{name}.json", redact_paths(payload))
    text = "\n".join(md_lines) + "\n"
    atomic_write_bytes(out / f"{name}.md", text.encode())
    print(text, end="")


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def index_folder(folder: str | Path, title: str, keys: Sequence[str], metric: str = "map50",
                 argv: Sequence[str] | None = None, write: bool = True) -> str:
    """The text of ``folder/README.md`` (written unless ``write`` is false): one table row per method of every results JSON in the folder, with the
    settings named by ``keys`` (dotted paths into the JSON, e.g. ``settings.class_kd``), the per-seed values
    of ``metric`` and their mean — an index generated from the files, so it cannot drift from them."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.json"))
    if not files:
        raise ValueError(f"no results JSON in {folder}")
    lines = [f"# {title}", "",
             f"Generated from the results files in this folder by `{shlex.join(argv or sys.argv)}`. Each file's "
             "command is in its `.md`/`.json`; its JSON's `settings` holds every value used (a flag the command "
             "omits took the script's default at the time it ran).", "",
             "| file | " + " | ".join(f"`{k.rsplit('.', 1)[-1]}`" for k in keys)
             + f" | method | {metric} per seed | {metric} mean | seeds | threads | command |",
             "|---|" + "---|" * len(keys) + "---|---|---|---|---|---|"]
    for p in files:
        d = json.loads(p.read_text())
        vals = " | ".join(str(_dotted(d, k)) for k in keys)
        for row in d.get("rows", []):
            per_seed = row.get(f"{metric}_per_seed") or []
            mean = row.get(metric)
            lines.append(f"| `{p.stem}` | {vals} | {row.get('method')} | "
                         + (", ".join(f"{v:.4f}" for v in per_seed) or "—") + " | "
                         + ("—" if mean is None else f"{mean:.4f}") + f" | {_dotted(d, 'seeds')} | "
                         + f"{_dotted(d, 'settings.threads') or _dotted(d, 'hardware.cpu_threads')} | "
                         + f"`{d.get('command', '')}` |")
    text = "\n".join(lines) + "\n"
    if write:
        atomic_write_bytes(folder / "README.md", text.encode())
    return text


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dfkd.bench", description="Results-file utilities.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ix = sub.add_parser("index", help="write FOLDER/README.md, a table generated from the results JSON files in it")
    ix.add_argument("folder", type=Path)
    ix.add_argument("--title", required=True)
    ix.add_argument("--keys", nargs="*", default=[], help="dotted JSON paths shown per file, e.g. settings.class_kd")
    ix.add_argument("--metric", default="map50", help="row field with a <metric>_per_seed list beside it")
    rd = sub.add_parser("redact", help="name folders in existing results files by a placeholder (path strings only)")
    rd.add_argument("files", nargs="+", type=Path)
    rd.add_argument("--replace", nargs="+", required=True, metavar="FOLDER=PLACEHOLDER",
                    help="e.g. /abs/checkout/results=results")
    args = ap.parse_args(argv)
    if args.cmd == "redact":
        try:
            pairs = dict(r.split("=", 1) for r in args.replace)
            if any(not a.startswith("/") or len(a) < 2 for a in pairs):
                raise ValueError("each FOLDER must be an absolute path")
            for f in args.files:
                text = f.read_text()
                if f.suffix == ".json":  # strings inside the JSON only; numbers and keys are untouched
                    out = json.dumps(redact_paths(json.loads(text), pairs), indent=2) + "\n"
                else:
                    out = redact_paths(text, pairs)
                atomic_write_bytes(f, out.encode())
        except (ValueError, OSError, json.JSONDecodeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        print(index_folder(args.folder, args.title, args.keys, args.metric,
                           argv=["python", "-m", "dfkd.bench", *(sys.argv[1:] if argv is None else argv)]), end="")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


ASHU_VIT = "teachers/vit_cifar10_ashu/vit_model.pth"  # the shared third-party CIFAR-10 ViT (inside DFKD_DATA)


def ashu_vit_teacher(data_root: str | Path, cache: str | Path) -> Path:
    """The shared third-party CIFAR-10 ViT (``nn.MultiheadAttention`` layout) converted once to timm's
    layout (4 heads, [0, 1] inputs, no normalisation) into ``cache``; returns the safetensors file."""
    from dfkd.errors import DfkdError
    from dfkd.models.convert import main as convert

    out = Path(cache) / "vit_cifar10_ashu.safetensors"
    if not (out.is_file() and out.with_suffix(".json").is_file()):
        rc = convert([str(Path(data_root) / ASHU_VIT), str(out), "--num-heads", "4", "--mean", "0", "0", "0",
                      "--std", "1", "1", "1"])
        if rc:
            raise DfkdError(f"converting {Path(data_root) / ASHU_VIT} failed (exit status {rc})")
    return out
