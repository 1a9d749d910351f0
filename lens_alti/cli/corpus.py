"""`lens-alti run`: ALTI for a whole corpus, in shards, resumable, over many processes.

Layout of the output folder `DIR`:
- `options.json` — the options of the run; a later run on the same `DIR` with other
  options is refused (`CorpusOptionsError`) rather than mixing results;
- `shard-000017.safetensors` — batch 17: a saved result (`lens_alti.load` reads it) whose
  header also holds `lens_alti_corpus` (the corpus rows of its batch items, and rows of
  that batch that failed). Written to a temporary name and renamed when complete, so a
  shard that exists is whole;
- `errors.jsonl` — one line per row that was not attributed: `{"row", "id", "reason"}`;
- `manifest.json` — written by rank 0 when every shard exists: options, versions,
  counts, and which rows each shard holds.

Batches are fixed by the data and the options alone (rows sorted by token length, then
cut into `batch_size` items, left-padded), so a resumed run, or a run with a different
number of processes, computes the same batches: finished shards are skipped and the one
in flight is redone. Under `torchrun` (torch.distributed; gloo on CPU, NCCL on GPUs)
rank r takes batches r, r + world, r + 2·world, ...
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lens_alti.api.inputs import left_pad
from lens_alti.errors import LensAltiError

OPTIONS_FILE = "options.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"
CORPUS_KEY = "lens_alti_corpus"
_POSITIONS = ("last", "all")


class CorpusOptionsError(LensAltiError, ValueError):
    """The output folder holds a run made with other options, or the options are invalid."""


@dataclass(frozen=True)
class RunOptions:
    """Everything that decides the numbers and the batches of a run (compared on resume)."""

    model: str
    data: str
    measure: str = "l1"
    heads: bool = False
    positions: str = "last"
    batch_size: int = 8
    max_length: int = 512
    text_field: str = "text"

    def check(self) -> None:
        if self.positions not in _POSITIONS:
            raise CorpusOptionsError(f"--positions must be one of {', '.join(_POSITIONS)}, got {self.positions!r}")
        if self.batch_size < 1 or self.max_length < 1:
            raise CorpusOptionsError("--batch-size and --max-length must be at least 1")


@dataclass(frozen=True)
class Row:
    row: int
    id: Any
    text: str


def shard_name(batch: int) -> str:
    return f"shard-{batch:06d}.safetensors"


def read_corpus(path: str | os.PathLike[str], text_field: str = "text") -> list[Row]:
    """Rows of a `.jsonl` (one JSON object per line, text under `text_field`, optional `id`),
    a `.txt` (one text per line) or a Hugging Face dataset saved with `save_to_disk`."""
    p = pathlib.Path(path)
    if p.is_dir():
        try:
            import datasets
        except ImportError as exc:
            raise CorpusOptionsError(f"{p} is a folder: reading a saved dataset needs `pip install datasets`") from exc
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise CorpusOptionsError(f"{p} holds splits {list(ds)}: pass one split's folder, e.g. {p}/{next(iter(ds))}")
        if text_field not in ds.column_names:
            raise CorpusOptionsError(f"{p} has columns {ds.column_names}, no {text_field!r}: pass --text-field")
        ids = ds["id"] if "id" in ds.column_names else [None] * len(ds)
        return [Row(i, ids[i], str(t)) for i, t in enumerate(ds[text_field])]
    if not p.is_file():
        raise FileNotFoundError(f"no data at {str(p)!r} (expected a .jsonl or .txt file, or a saved dataset folder)")
    if p.suffix == ".txt":
        return [Row(i, None, line.rstrip("\n")) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines())]
    if p.suffix not in (".jsonl", ".json"):
        raise CorpusOptionsError(f"{p}: unknown data format {p.suffix!r}; use .jsonl, .txt or a saved dataset folder")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusOptionsError(f"{p}, line {i + 1}: not JSON ({exc})") from exc
        if not isinstance(obj, dict) or text_field not in obj:
            raise CorpusOptionsError(f"{p}, line {i + 1}: no {text_field!r} field (pass --text-field)")
        rows.append(Row(i, obj.get("id"), str(obj[text_field])))
    return rows


def plan_batches(
    rows: list[Row], to_ids: Callable[[str], Tensor], batch_size: int, max_length: int
) -> tuple[list[list[tuple[Row, Tensor]]], list[dict[str, Any]]]:
    """(batches of (row, ids) sorted by length, rows refused before running with their reason)."""
    items, errors = [], []
    for r in rows:
        if not r.text.strip():
            errors.append({"row": r.row, "id": r.id, "reason": "empty text"})
            continue
        ids = to_ids(r.text)
        if len(ids) > max_length:
            reason = f"{len(ids)} tokens, longer than --max-length {max_length}"
            errors.append({"row": r.row, "id": r.id, "reason": reason})
            continue
        items.append((r, ids))
    items.sort(key=lambda it: (len(it[1]), it[0].row))
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)], errors


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_shard(path: pathlib.Path, result: Any, corpus: dict[str, Any]) -> None:
    """One batch's result and its corpus rows, written to a temporary name then renamed."""
    from lens_alti.results.saving import to_bytes_dict, write_atomic

    tensors, header = ({}, {}) if result is None else to_bytes_dict(result)
    header[CORPUS_KEY] = json.dumps(corpus, default=str)
    write_atomic(path, tensors, header)


def shard_corpus(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The corpus header of a shard: `rows` (one per batch item), `ids`, `errors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})[CORPUS_KEY])


def _check_options(out: pathlib.Path, opts: RunOptions) -> bool:
    """True if `out` already holds this run; raise if it holds another one."""
    path = out / OPTIONS_FILE
    if not path.exists():
        return False
    old = json.loads(path.read_text(encoding="utf-8")).get("options", {})
    new = dataclasses.asdict(opts)
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise CorpusOptionsError(
            f"{out} holds a run made with other options ({diff}). Re-run with the original options to resume, "
            "or choose a new --out folder."
        )
    return True


def _attribute(model: Any, batch: list[tuple[Row, Tensor]], opts: RunOptions, pad: int) -> Any:
    import lens_alti

    ids, mask = left_pad([t for _, t in batch], pad)
    device = next(model.parameters()).device
    return lens_alti.attribute(
        model, tokens=ids.to(device), attention_mask=mask.to(device), measure=opts.measure, heads=opts.heads,
        positions=[-1] if opts.positions == "last" else None, progress=False, output_device="cpu",
    )


def attribute_batch(
    model: Any, batch: list[tuple[Row, Tensor]], opts: RunOptions, pad: int
) -> tuple[Any, list[tuple[Row, Tensor]], list[dict[str, Any]]]:
    """(result, rows it holds, failed rows). A failing batch is retried item by item; the
    items that fail alone are recorded and the others are run again as one batch."""
    try:
        return _attribute(model, batch, opts, pad), batch, []
    except LensAltiError as first:
        if len(batch) == 1:
            r = batch[0][0]
            return None, [], [{"row": r.row, "id": r.id, "reason": f"{type(first).__name__}: {first}"}]
    good, errors = [], []
    for item in batch:
        try:
            _attribute(model, [item], opts, pad)
            good.append(item)
        except LensAltiError as exc:
            errors.append({"row": item[0].row, "id": item[0].id, "reason": f"{type(exc).__name__}: {exc}"})
    if not good:
        return None, [], errors
    try:
        return _attribute(model, good, opts, pad), good, errors
    except LensAltiError as exc:
        reason = f"{type(exc).__name__} in a batch whose items pass alone: {exc}"
        return None, [], errors + [{"row": it[0].row, "id": it[0].id, "reason": reason} for it in good]


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def run_corpus(
    opts: RunOptions,
    out_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    progress: bool = True,
    model: Any = None,
    dist: Distributed | None = None,
) -> dict[str, Any] | None:
    """Attribute every row of `opts.data` into shards under `out_dir`; resume if it has some.

    Returns the manifest on rank 0 (None on other ranks). `model` may be given to skip
    loading `opts.model` (tests, notebooks).
    """
    opts.check()
    dist = dist or Distributed.from_env(device)
    if device.startswith("cuda") and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resumed = _check_options(out, opts)
    dist.barrier()
    if dist.rank == 0 and not resumed:
        from lens_alti.results.saving import versions

        _write_json(out / OPTIONS_FILE, {"options": dataclasses.asdict(opts), "versions": versions()})
    dist.barrier()
    if model is None:
        from lens_alti.models.pretrained import load_pretrained

        model = load_pretrained(opts.model, device=device)
    if hasattr(model, "encoder_blocks") or type(model).__name__ == "HookedEncoderDecoder":
        raise CorpusOptionsError("lens-alti run attributes decoder-only and encoder models; this is an encoder-decoder")
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None) or 0

    rows = read_corpus(opts.data, opts.text_field)
    batches, refused = plan_batches(rows, lambda t: model.to_tokens(t)[0].cpu(), opts.batch_size, opts.max_length)
    mine = list(range(dist.rank, len(batches), dist.world))
    for stale in out.glob(".shard-*.tmp-*"):  # a run killed mid-write leaves these
        if int(stale.name[len(".shard-") :].split(".")[0]) in mine:
            stale.unlink(missing_ok=True)
    todo = [b for b in mine if not (out / shard_name(b)).exists()]
    total = sum(len(batches[b]) for b in mine)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=total - sum(len(batches[b]) for b in todo), unit="item",
        desc=f"lens-alti run [{dist.rank}]", disable=not progress or dist.rank != 0, dynamic_ncols=True,
    )
    try:
        for b in todo:
            result, kept, failed = attribute_batch(model, batches[b], opts, pad)
            corpus = {"batch": b, "rows": [r.row for r, _ in kept], "ids": [r.id for r, _ in kept], "errors": failed}
            _write_shard(out / shard_name(b), result, corpus)
            bar.update(len(batches[b]))
    finally:
        bar.close()
    dist.barrier()
    if dist.rank != 0:
        return None
    return _finish(out, opts, batches, refused, rows, dist.world)


def _finish(
    out: pathlib.Path, opts: RunOptions, batches: list[Any], refused: list[dict[str, Any]], rows: list[Row], world: int
) -> dict[str, Any]:
    """errors.jsonl and manifest.json from the shards (rank 0, once every shard exists)."""
    from lens_alti.results.saving import versions

    shards, errors = [], list(refused)
    for b in range(len(batches)):
        path = out / shard_name(b)
        if not path.exists():
            raise LensAltiError(f"{path} is missing after every rank finished; re-run the same command to redo it")
        corpus = shard_corpus(path)
        shards.append({"file": path.name, "rows": corpus["rows"]})
        errors.extend(corpus["errors"])
    errors.sort(key=lambda e: e["row"])
    tmp = out / f".{ERRORS_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in errors), encoding="utf-8")
    os.replace(tmp, out / ERRORS_FILE)
    manifest = {
        "format": "lens_alti.cli.corpus",
        "format_version": 1,
        "options": dataclasses.asdict(opts),
        "versions": versions(),
        "rows": len(rows),
        "attributed": sum(len(s["rows"]) for s in shards),
        "errors": len(errors),
        "world_size": world,
        "shards": shards,
    }
    _write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = pathlib.Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST_FILE} in {out_dir}: the run has not finished (re-run it to resume)")
    return json.loads(path.read_text(encoding="utf-8"))


def select_item(result: Any, index: int) -> Any:
    """Batch item `index` of an AltiResult, as a batch of one."""
    batch = result.layers.shape[0]
    changes = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        per_item = isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch
        if per_item and f.name != "reconstruction_error":
            changes[f.name] = value[index : index + 1]
    if result.str_tokens is not None:
        changes["str_tokens"] = result.str_tokens[index : index + 1]
    return dataclasses.replace(result, **changes)


def load_item(out_dir: str | os.PathLike[str], row: int) -> Any:
    """The AltiResult of corpus row `row` (a batch of one; still left-padded like its batch)."""
    from lens_alti.results.saving import load

    for shard in _manifest(out_dir)["shards"]:
        if row in shard["rows"]:
            return select_item(load(pathlib.Path(out_dir) / shard["file"]), shard["rows"].index(row))
    raise KeyError(f"row {row} is not in the results of {out_dir} (see {ERRORS_FILE} for rows that failed)")


def read_table(out_dir: str | os.PathLike[str], which: str = "rollout", layer: int | None = -1) -> Any:
    """One pandas DataFrame over every shard: `row`, `id`, then `to_dataframe(which)`'s columns.

    `layer=-1` keeps the last layer (the final attribution for `rollout`), None keeps all.
    Padding is left out; `query`/`key` are positions in each row's own (unpadded) tokens.
    """
    import numpy as np
    import pandas as pd

    from lens_alti.errors import ResultFormatError
    from lens_alti.results import AltiResult
    from lens_alti.results.saving import load

    frames = []
    for shard in _manifest(out_dir)["shards"]:
        if not shard["rows"]:
            continue
        path = pathlib.Path(out_dir) / shard["file"]
        result = load(path)
        if not isinstance(result, AltiResult):
            raise ResultFormatError(f"{path} holds a {type(result).__name__}, not the AltiResult of a corpus shard")
        frame = result.to_dataframe(which)
        if layer is not None:
            frame = frame[frame["layer"] == (layer % result.n_layers)]
        pad = (1 - result.attention_mask).sum(-1).numpy()  # left padding per item
        b = frame["batch"].to_numpy()
        frame = frame.assign(query=frame["query"].to_numpy() - pad[b], key=frame["key"].to_numpy() - pad[b])
        ids = np.array(shard_corpus(path)["ids"] + [None], dtype=object)[:-1]  # object array, even for lists
        frame.insert(0, "id", ids[b])
        frame.insert(0, "row", np.asarray(shard["rows"])[b])
        frames.append(frame.drop(columns="batch"))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
