"""The sharded checkpoint store: every layout pair round-trips the weights and both Adam moments bit for bit, a rank
reads only the chunks that hold its slices (counted), faithful per-rank copies are kept, a failed write (full disk)
leaves the previous checkpoint intact, damage is named, and the first format converts.

Ranks are in-process threads (`ranks.run_ranks`) running the real groups and the real store code; the SIGKILL-mid-write
case needs real processes and is in tests/test_reliability.py."""
import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import jigsaw_ref.checkpoint as ckpt
from jigsaw_ref.checkpoint import (KINDS, CheckpointError, Reader, convert, from_runs, load_checkpoint, load_full,
                                   load_sharded, main, read_manifest, save_checkpoint, save_sharded)
from jigsaw_ref.comm import make_groups
from jigsaw_ref.config import preset
from jigsaw_ref.grid import Grid
from jigsaw_ref.mixer import param_shapes
from jigsaw_ref.parallel import JigsawMixer, take
from jigsaw_ref.ranks import run_ranks

torch.set_num_threads(1)
CFG = preset("tiny")
LAYOUTS = {"1x1": Grid(1, 1, 1), "1x2": Grid(1, 1, 2), "2x1": Grid(1, 2, 1), "2x2": Grid(1, 2, 2), "1x4": Grid(1, 1, 4),
           "dp2x1x2": Grid(2, 1, 2)}
_g = torch.Generator().manual_seed(7)
FULL = {k: {n: torch.randn(s, generator=_g, dtype=torch.float64) for n, s in param_shapes(CFG).items()} for k in KINDS}


@pytest.fixture(scope="module", autouse=True)
def _no_fsync():
    "Durability against a power cut is not what these tests can see, and fsync of every chunk costs minutes on a busy disk."
    saved, ckpt.FSYNC = ckpt.FSYNC, False
    yield
    ckpt.FSYNC = saved


def _groups_model(comm, grid, mode="exact", init=True):
    g = make_groups(grid, comm=comm)
    return g, JigsawMixer(CFG, g["tensor"], g["domain"], mode, torch.float64, init=init)


def _set(m, opt, full=FULL, offset=0.0):
    "This rank's blocks of `full` (+ `offset` on replicated tensors) as the weights and Adam state of `m`."
    for n, t in m.state().items():
        add = offset if m.spec[n][1] is not None else 0.0
        t.data.copy_(take(full["params"][n], m.spec[n][0]) + add)
        opt.state[t] = {"step": torch.tensor(5.0), **{k: take(full[k][n], m.spec[n][0]) + add for k in KINDS[1:]}}


def _write(comm, grid, path, mode="exact", per_rank_offsets=False, chunk_bytes=8192):
    g, m = _groups_model(comm, grid, mode)
    opt = torch.optim.Adam(m.parameters())
    _set(m, opt, offset=float(comm.Get_rank()) if per_rank_offsets else 0.0)
    d = grid.coords(comm.Get_rank())[0]
    return save_sharded(path, m, opt, {"step": 5}, g["world"], d, chunk_bytes=chunk_bytes)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    "One store per writing layout, written once."
    root = tmp_path_factory.mktemp("stores")
    for name, grid in LAYOUTS.items():
        run_ranks(grid.world, _write, grid, root / f"{name}.ckpt")
    return root


def _read_back(comm, grid, path):
    "Whether this rank's weights and moments, loaded from `path`, equal its blocks of FULL bit for bit; and the Adam step."
    _, m = _groups_model(comm, grid, init=False)
    opt = torch.optim.Adam(m.parameters())
    load_sharded(path, m, opt)
    bad = [n for n, t in m.state().items() if not torch.equal(t, take(FULL["params"][n], m.spec[n][0]))
           or any(not torch.equal(opt.state[t][k], take(FULL[k][n], m.spec[n][0])) for k in KINDS[1:])]
    return bad, {float(s["step"]) for s in opt.state.values()}


@pytest.mark.parametrize("reader", list(LAYOUTS))
@pytest.mark.parametrize("writer", list(LAYOUTS))
def test_every_layout_pair_round_trips_weights_and_moments_bit_for_bit(stores, writer, reader):
    grid = LAYOUTS[reader]
    res = run_ranks(grid.world, _read_back, grid, stores / f"{writer}.ckpt")
    assert all(bad == [] for bad, _ in res), [bad[:3] for bad, _ in res]
    assert all(steps == {5.0} for _, steps in res)


def test_exact_mode_writes_replicated_tensors_once_and_dp_replicas_not_at_all(stores):
    man = read_manifest(stores / "dp2x1x2.ckpt")
    writers = {b["writer"] for b in man["blocks"]}
    assert writers == {"i0j0", "i0j1"}  # the dp replica 1 wrote nothing
    ln = [b for b in man["blocks"] if b["name"] == "blocks.0.ln1.w" and b["kind"] == "params"]
    assert len(ln) == 2 and all(b["replica"] == 0 for b in ln)  # 1x2: LayerNorm weights split over j, "replicated" over 1 domain rank
    man = read_manifest(stores / "2x1.ckpt")
    ln = [b for b in man["blocks"] if b["name"] == "blocks.0.ln1.w" and b["kind"] == "params"]
    assert [(b["writer"], b["replica"]) for b in ln] == [("i0j0", 0)]  # replicated over the domain pair: written once


# ---------------------------------------------------------------------------------------------- reads are slices

def _chunk_box(b, coords):
    "Global indices, per dim, of chunk `coords` of block record `b`."
    return [from_runs(r)[k * c: (k + 1) * c] for r, c, k in zip(b["index"], b["chunks"], coords)]


def _read_counted(comm, grid, path):
    "Load `path` on `grid`; (chunk keys read, chunk bytes read, bytes this rank's blocks hold, {name: need})."
    _, m = _groups_model(comm, grid, init=False)
    opt = torch.optim.Adam(m.parameters())
    r = Reader(path)
    got = load_sharded(r, m, opt)
    need = {n: m.spec[n][0] for n in m.state()}
    mine = 3 * sum(t.numel() * t.element_size() for t in m.state().values())
    return list(r.store.keys), got["chunk_bytes"], mine, need


@pytest.mark.parametrize("reader", ["1x4", "2x1", "1x2"])
def test_a_rank_reads_only_the_chunks_that_hold_its_slices(tmp_path, reader):
    path = tmp_path / "w2x2.ckpt"
    run_ranks(4, _write, LAYOUTS["2x2"], path, chunk_bytes=1024)  # small chunks: blocks of several chunks each
    man = read_manifest(path)
    blocks = {b["path"]: b for b in man["blocks"]}
    total = sum(p.stat().st_size for p in path.rglob("*") if "/c/" in str(p) and p.is_file())
    grid = LAYOUTS[reader]
    for keys, nbytes, mine, need in run_ranks(grid.world, _read_counted, grid, path):
        assert len(keys) == len(set(keys))  # no chunk read twice
        for key in keys:  # every chunk read holds at least one element this rank needs, in every dimension
            arr, coords = key.split("/c/")
            b = blocks[arr]
            box = _chunk_box(b, [int(c) for c in coords.split("/")])
            assert all(np.intersect1d(bx, nd).size for bx, nd in zip(box, need[b["name"]])), key
        assert 0 < nbytes < 0.75 * total, (nbytes, mine, total)  # about its share (chunk margins), never the whole store


def test_a_one_process_reader_reads_exactly_what_was_written(tmp_path):
    path = tmp_path / "w.ckpt"
    written = [s["bytes"] for s in run_ranks(4, _write, LAYOUTS["2x2"], path, chunk_bytes=4096)]
    (keys, nbytes, _, _), = run_ranks(1, _read_counted, LAYOUTS["1x1"], path)
    assert nbytes == sum(written) == sum(p.stat().st_size for p in path.rglob("*") if "/c/" in str(p) and p.is_file())


# ------------------------------------------------------------------------------------------------- faithful mode

def _faithful_expected(path):
    "The full tensors a non-owning layout should get from the faithful store at `path`: replica 0's copies."
    man = read_manifest(path)
    out = {k: {n: v.clone() for n, v in FULL[k].items()} for k in KINDS}
    for b in man["blocks"]:
        if b["replica"] == 0:
            i, j = int(b["writer"][1]), int(b["writer"][3])
            idx = [from_runs(r) for r in b["index"]]
            out[b["kind"]][b["name"]][np.ix_(*idx)] += float(i * 2 + j)  # the writer's rank in the 2x2 group
    return out


def _read_faithful(comm, grid, path, expected):
    _, m = _groups_model(comm, grid, "faithful", init=False)
    opt = torch.optim.Adam(m.parameters())
    got = load_sharded(path, m, opt)
    bad = [n for n, t in m.state().items() if not torch.equal(t, take(expected[comm.Get_rank()]["params"][n], m.spec[n][0])
           if isinstance(expected, list) else take(expected["params"][n], m.spec[n][0]))]
    return bad, got["notes"]


def test_faithful_per_rank_copies_are_kept_and_restored_on_their_layout(tmp_path):
    path = tmp_path / "f.ckpt"
    run_ranks(4, _write, LAYOUTS["2x2"], path, "faithful", True)
    man = read_manifest(path)
    assert {b["replica"] for b in man["blocks"]} == {None, 0, 1}  # every copy is there
    # the same layout: rank r gets its own copies (FULL + r on replicated tensors)
    rep = _replicated()
    own = [{"params": {n: v + (r if n in rep else 0.0) for n, v in FULL["params"].items()}} for r in range(4)]
    res = run_ranks(4, _read_faithful, LAYOUTS["2x2"], path, own)
    assert all(bad == [] and notes == [] for bad, notes in res), res
    # another layout: replica 0's copies, and it says so
    res = run_ranks(2, _read_faithful, LAYOUTS["1x2"], path, _faithful_expected(path))
    assert all(bad == [] for bad, _ in res), res
    assert all(any("takes replica 0's copy" in n for n in notes) for _, notes in res)


def _replicated():
    "Names of the tensors replicated over partners in a faithful 2x2 group (the same on every rank)."
    def names(comm):
        _, m = _groups_model(comm, LAYOUTS["2x2"], "faithful", init=False)
        return {n for n, (_, rep, _) in m.spec.items() if rep is not None}
    return run_ranks(4, names)[0]


# ----------------------------------------------------------------------------------------- failures mid-write

def _save_or_error(comm, grid, path, step):
    g, m = _groups_model(comm, grid)
    opt = torch.optim.Adam(m.parameters())
    _set(m, opt)
    try: save_sharded(path, m, opt, {"step": step}, g["world"], 0, step, chunk_bytes=8192)
    except Exception as e: return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("target", ["step0000002.ckpt", "step0000001.ckpt"], ids=["new name", "overwrite"])
def test_a_full_disk_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target):
    first = tmp_path / "step0000001.ckpt"
    assert run_ranks(4, _save_or_error, LAYOUTS["2x2"], first, 1) == [None] * 4
    before = sorted((p.relative_to(first), p.read_bytes()) for p in first.rglob("*") if p.is_file())
    monkeypatch.setenv("JIGSAW_FAULT", "enospc-checkpoint@1:2")  # rank 1, halfway through its share
    errs = run_ranks(4, _save_or_error, LAYOUTS["2x2"], tmp_path / target, 2)
    assert all(e and e.startswith("CheckpointError") and "the previous checkpoint is intact" in e for e in errs), errs
    assert "No space left on device" in errs[1] and "free disk space" in errs[1]
    assert all("rank 1 failed" in e for r, e in enumerate(errs) if r != 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000001.ckpt"]  # no temp folder, no new checkpoint
    assert sorted((p.relative_to(first), p.read_bytes()) for p in first.rglob("*") if p.is_file()) == before
    monkeypatch.delenv("JIGSAW_FAULT")
    assert all(bad == [] for bad, _ in run_ranks(2, _read_back, LAYOUTS["1x2"], first))


def test_an_uncommitted_folder_is_no_checkpoint(tmp_path, stores):
    half = tmp_path / "half.ckpt"
    shutil.copytree(stores / "2x2.ckpt", half)
    (half / "manifest.json").unlink()  # what a writer killed before the commit leaves (under a temporary name)
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        load_full(half)


# --------------------------------------------------------------------------------------------- damage is named

def _first_chunk(folder: Path, arr: str) -> Path:
    return sorted(p for p in (folder / arr / "c").rglob("*") if p.is_file())[0]


@pytest.mark.parametrize("how,msg", [
    ("flip", r"exp_avg_sq of 'blocks\.2\.ch1\.w', block i1j1, chunk \(0, 0\): checksum mismatch"),
    ("truncate", r"exp_avg_sq of 'blocks\.2\.ch1\.w', block i1j1, chunk \(0, 0\): checksum mismatch"),
    ("delete", r"exp_avg_sq of 'blocks\.2\.ch1\.w', block i1j1, chunk \(0, 0\): missing"),
    ("manifest", r"manifest\.json: checksum mismatch"),
    ("array metadata", r"exp_avg_sq of 'blocks\.2\.ch1\.w', block i1j1: its array cannot be opened"),
])
def test_damage_is_refused_naming_the_tensor_and_block(tmp_path, stores, how, msg):
    bad = tmp_path / "bad.ckpt"
    shutil.copytree(stores / "2x2.ckpt", bad)
    arr = "exp_avg_sq/blocks.2.ch1.w/i1j1"
    chunk = _first_chunk(bad, arr)
    if how == "flip": raw = bytearray(chunk.read_bytes()); raw[len(raw) // 2] ^= 0x01; chunk.write_bytes(raw)
    if how == "truncate": chunk.write_bytes(chunk.read_bytes()[:-20])
    if how == "delete": chunk.unlink()
    if how == "manifest":
        f = bad / "manifest.json"; f.write_text(f.read_text().replace('"step": 5', '"step": 6'))
    if how == "array metadata": (bad / arr / "zarr.json").write_text("{")
    with pytest.raises(CheckpointError, match=msg) as e:
        load_checkpoint(bad)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------- the first format, the command line

def test_the_first_format_converts_and_loads_everywhere(tmp_path):
    old = tmp_path / "old.ckpt"
    save_checkpoint(old, {"format": "jigsaw_ref/1", "config": __import__("dataclasses").asdict(CFG), "step": 5,
                          "params": FULL["params"], "adam": {"step": 5.0, **{k: FULL[k] for k in KINDS[1:]}},
                          "scheduler": {}, "lrs": [1e-3, 1e-3], "mode": "exact", "layout": (1, 2, 2), "history": []})
    cfg, params, meta = load_full(old)
    assert cfg == CFG and all(torch.equal(params[n], FULL["params"][n]) for n in params) and meta["step"] == 5
    new = tmp_path / "new.ckpt"
    assert main(["convert", str(old), str(new)]) == 0
    for name, grid in (("2x2", LAYOUTS["2x2"]), ("1x4", LAYOUTS["1x4"])):
        assert all(bad == [] for bad, _ in run_ranks(grid.world, _read_back, grid, new)), name
    assert main(["verify", str(new)]) == 0 and main(["info", str(new)]) == 0


def test_load_full_gives_the_one_process_model(stores):
    cfg, params, meta = load_full(stores / "1x4.ckpt")
    assert cfg == CFG and meta["step"] == 5 and meta["mode"] == "exact" and "blocks" not in meta
    assert set(params) == set(param_shapes(CFG)) and all(torch.equal(params[n], FULL["params"][n]) for n in params)
    _, _, meta = load_full(stores / "1x4.ckpt", moments=True)
    assert torch.equal(meta["adam"]["exp_avg"]["dec.w"], FULL["exp_avg"]["dec.w"])


def test_the_command_line_refuses_a_bad_checkpoint_with_exit_2(tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    assert main(["verify", str(tmp_path / "junk.ckpt")]) == 2
    assert main(["convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "jigsaw-ckpt: error:" in err and "bad header" in err and "no such checkpoint file" in err


# --------------------------------------------------------------- a reader racing a replacement (issue 22 item 1)

def _commit_loop(comm, path, commits):
    "Rank r of 2 writes rows 2r, 2r+1 of a (4, 8) tensor filled with the commit number, `commits` times over one path."
    from jigsaw_ref.comm import Group
    world = Group(comm)
    rows = [2 * world.rank, 2 * world.rank + 1]
    for n in range(1, commits + 1):
        b = ckpt.block_record("params", "w", [rows, list(range(8))], None, f"i{world.rank}j0", torch.float64, chunk_bytes=64)
        ckpt.write_store(path, [(b, torch.full((2, 8), float(n), dtype=torch.float64))], {"shapes": {"w": [4, 8]}, "n": n}, world)


def test_a_reader_racing_repeated_commits_reads_one_checkpoint_or_a_clear_retryable_error(tmp_path, monkeypatch):
    "Readers in a loop against 30 commits by 2 ranks: every read is all one commit (its manifest's), or says to read again."
    monkeypatch.setattr(ckpt, "FSYNC", False)
    path = tmp_path / "final.ckpt"
    run_ranks(2, _commit_loop, path, 1)
    import threading
    done, seen, retry = threading.Event(), [], []

    def read_loop():
        while not done.is_set():
            try:
                r = Reader(path)
                out = np.zeros((4, 8))
                r.read("params", "w", [np.arange(4), np.arange(8)], out)
                seen.append((r.man["n"], set(np.unique(out).tolist())))
            except CheckpointError as e:
                assert "was replaced by a newer checkpoint while being read" in str(e) or "no such checkpoint" in str(e) \
                    or "not a committed checkpoint" in str(e), str(e)
                retry.append(str(e))
    th = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in th: t.start()
    try: run_ranks(2, _commit_loop, path, 30)
    finally:
        done.set()
        for t in th: t.join()
    assert len(seen) > 10, (len(seen), len(retry))
    mixed = [(n, vals) for n, vals in seen if vals != {float(n)}]
    assert not mixed, mixed[:5]  # every value read belongs to the commit whose manifest was read
    assert len({n for n, _ in seen}) > 1  # the readers did race the commits
