"""Spot checks (templar_lib/spot_check.py): a drawn miner's window replayed from the state it committed to."""
import copy
import dataclasses
import functools
import json
import random
import time

import pytest
import torch

from templar_lib.buckets import LocalBucket, ObjectMissing
from templar_lib.chain import LocalChain
from templar_lib.checkpoints import ModelState
from templar_lib.data import Dataset
from templar_lib.hparams import HParams, HParamsError
from templar_lib.model import build_model, parameters_of
from templar_lib.roles.miner import answer_spot_checks, mark_late, mine_window, skip_window
from templar_lib.commitments import PeerBuckets
import templar_lib.roles.miner as miner_role
import templar_lib.roles.spot_checks as spot_checks
from templar_lib.roles.spot_checks import (BANNED, MINORITY_RESET_WINDOWS, PENDING, Records, kept_windows,
                                           file_commitments, record_commitments, reset_period, validator_records)
from templar_lib.roles.validator import evaluate_window
from templar_lib.scoring import Score, zero_score
from templar_lib.simulate.adversaries import kept_back
from templar_lib.sparseloco import _to_rows, selection_gaps
from templar_lib.spot_check import (ZEROS, answer, check, commitment, committed, drawn, linked, relative_difference,
                                    sent_values, state_digest, values_difference)
from templar_lib.state import StateStore, WriteBehind
from templar_lib.strategies import STRATEGIES, strategy_of
from templar_lib.wire import InvalidFile, evaluation_key, gradient_key
from templar_lib.wire.documents import EvaluationReport, Recorded, read_evaluation, write_evaluation
from templar_lib.wire.keys import miner_state_key
from templar_lib.wire.miner_state import read_miner_state, write_miner_state
from templar_lib.watch import Watch

FAST = HParams(learning_rate=2e-3, warmup_steps=0, pages_per_window=2, batch_size=4, checkpoint_frequency=2,
               spot_check_probability=1.0, spot_check_tolerance=0.0)  # bit for bit: miner and validator in one process
EACH = pytest.mark.parametrize("name", sorted(STRATEGIES))


def copied(state):
    return None if state is None else {k: v.clone() for k, v in state.items()}


def mine(strategy, model, data, window, uid, state, *, rows=None):
    """What a miner uploads for `window` from `state` (or, with rows, from the first rows of its pages only), with
    its commitment, and the state after."""
    tokens = data.tokens(data.miner_pages(window, uid, strategy.hparams.pages_per_window))[:rows]
    before = copied(state)
    mined = strategy.mine(model, state, tokens, step=window)
    file = strategy.write_gradient(window, uid, mined.sent, model_hash="ab" * 16,
                                   state=commitment(before, mined.state))
    return file, before, mined.state


def read_sent(strategy, file: bytes, model) -> dict:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return strategy.read_gradient(file, window=1, uid=1, shapes=shapes).tensors


def checker(strategy, model, data, bucket, window, uid, hparams=None):
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = data.tokens(data.miner_pages(window, uid, strategy.hparams.pages_per_window))

    def run(scored):
        return check(window, uid, hparams=hparams or strategy.hparams, model=model, theta=theta, step=window,
                     tokens=tokens, scored=scored, fetch=lambda key, limit: bucket.get(key, max_bytes=limit))
    return run


@EACH
def test_an_honest_window_replays_to_its_file_and_a_cheap_one_does_not(name, model_and_data, tmp_path):
    """Two windows of one miner on the same θ (what matters is the state carried): window 1 continues from the state
    window 0's file committed to after it, and its replay is the file, bit for bit. Then what a cheat can try, each
    in the order production runs it (the file first, the states put after the window closed)."""
    model, data = model_and_data
    strategy, bucket = strategy_of(FAST.replace(strategy=name)), LocalBucket(tmp_path / "miner")
    first, _, after_first = mine(strategy, model, data, 0, 1, None)
    second, before, after = mine(strategy, model, data, 1, 1, copied(after_first))  # demo's updates it in place
    assert answer(1, 1, seed="close", before=before, after=after, bucket=bucket, hparams=strategy.hparams) == [
        miner_state_key(1, 1, "before")]  # bit for bit the replay's own state after is checked against the file
    run = checker(strategy, model, data, bucket, 1, 1)
    assert run(second) is None
    # a fresh start needs no state put
    fresh, _, _ = mine(strategy, model, data, 1, 1, None)
    assert run(fresh) is None
    # the link: a state before is a fresh start or the state after of the uid's recorded file of the window before
    hparams = strategy.hparams
    recorded = {1: Recorded(ZEROS, committed(first, window=0, uid=1, hparams=hparams).after, 0, "hotkey-1")}
    assert all(linked(committed(f, window=1, uid=1, hparams=hparams), recorded, 1, "hotkey-1") for f in (second, fresh))
    assert not linked(committed(second, window=1, uid=1, hparams=hparams), {}, 1, "hotkey-1")  # nothing recorded
    other = committed(fresh, window=1, uid=1, hparams=hparams).after  # another file's state after
    assert not linked(committed(second, window=1, uid=1, hparams=hparams), {1: Recorded(ZEROS, other, 0, "hotkey-1")},
                      1, "hotkey-1")
    # the uid registered anew: the recorded file was someone else's, only a fresh start links
    assert not linked(committed(second, window=1, uid=1, hparams=hparams), recorded, 1, "hotkey-2")
    assert linked(committed(fresh, window=1, uid=1, hparams=hparams), recorded, 1, "hotkey-2")
    # half the work (the first rows of its pages) from its real state: another file
    thin, before_thin, after_thin = mine(strategy, model, data, 1, 1, copied(after_first), rows=2)
    reason = run(thin)
    assert reason.startswith("replaying its window from its committed state gives another file (values ")
    assert float(reason.split("(values ")[1].split()[0]) > 0.05  # what sets it apart from other kernels' rounding
    # the state put must hash to the commitment
    bucket.put(miner_state_key(1, 1, "before"), write_miner_state(1, 1, "before", {
        k: v + 1 if v.dtype == torch.float32 else v for k, v in before.items()}))
    with pytest.raises(InvalidFile, match="does not hash to its commitment"):
        run(second)
    # and it must be there
    bucket.delete(miner_state_key(1, 1, "before"))
    with pytest.raises(ObjectMissing):
        run(second)
    # a state that breaks the replay (a negative step count, here) is the miner's failure, not the validator's crash
    broken = {k: -v if k == "adam_t" else v for k, v in before.items()} if name == "sparseloco" else None
    if broken is not None:
        hostile = strategy.write_gradient(1, 1, read_sent(strategy, second, model), model_hash="ab" * 16,
                                          state=commitment(broken, after))
        bucket.put(miner_state_key(1, 1, "before"), write_miner_state(1, 1, "before", broken))
        assert run(hostile).startswith("its state does not replay")


@EACH
def test_a_tolerance_passes_a_near_replay_and_names_what_differs(name, model_and_data, tmp_path):
    """Where replays cannot be bit for bit (other machines' kernels), values and states are compared within the
    tolerance; the state after must then be put too and hash to its commitment, and a tensor of it put as zeros is
    as far from a replay as can be (not within the tolerance because the honest tensor is small)."""
    model, data = model_and_data
    hparams = FAST.replace(strategy=name, spot_check_tolerance=HParams().spot_check_tolerance)  # a fresh start: ×20
    strategy, bucket = strategy_of(hparams), LocalBucket(tmp_path / "miner")
    file, before, after = mine(strategy, model, data, 0, 1, None)
    nudged = {k: v * 1.0005 if v.dtype == torch.float32 else v for k, v in after.items()}  # another machine's rounding
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    read = strategy.read_gradient(file, window=0, uid=1, shapes=shapes)
    near = strategy.write_gradient(0, 1, read.tensors, model_hash="ab" * 16, state=commitment(None, nudged))
    assert answer(0, 1, seed="close", before=before, after=nudged, bucket=bucket, hparams=hparams) == [
        miner_state_key(0, 1, "after")]  # a fresh start has no state before; the state after is compared
    run = checker(strategy, model, data, bucket, 0, 1, hparams)
    assert run(near) is None  # bit for bit it would be another file: its state after differs
    smallest = min((k for k, v in after.items() if v.dtype == torch.float32 and v.norm() > 0),
                   key=lambda k: float(after[k].norm()))
    zeroed = {**after, smallest: torch.zeros_like(after[smallest])}  # a made-up state: AdamW's v at 0, say
    answer(0, 1, seed="close", before=None, after=zeroed, bucket=bucket, hparams=hparams)
    made_up = strategy.write_gradient(0, 1, read.tensors, model_hash="ab" * 16, state=commitment(None, zeroed))
    assert run(made_up) == (f"replaying its window from its committed state gives another state {smallest} "
                            f"(relative difference 1 > {hparams.spot_check_tolerance:g})")
    thin, _, after_thin = mine(strategy, model, data, 0, 1, None, rows=2)
    answer(0, 1, seed="close", before=None, after=after_thin, bucket=bucket, hparams=hparams)
    assert "relative difference" in run(thin)


def tie_broken_otherwise(sent, accumulation=None, *, move="tie"):
    """One parameter's entry with a kept value of its first chunk moved to a position it did not keep. Without the
    top-k's accumulation (demo), its smallest value to the first position not kept. With it (sparseloco: β·e + Δ),
    `move` says which: "tie", the kept position of the smallest |a| to the largest |a| not kept (what a tie broken
    the other way by another machine's rounding does); "far", the same value to the smallest |a| not kept; "drop",
    the kept position of the largest |a| to the largest |a| not kept (no rounding would do either)."""
    values = sent.vals[0].float() if hasattr(sent, "vals") else sent.table[sent.codes[0].long()] + sent.shift
    idx, kept = sent.idx.clone(), set(sent.idx[0].tolist())
    unkept = [p for p in range(int(torch.tensor(sent.chunk).prod())) if p not in kept]
    if accumulation is None:
        slot, new = int(values.abs().argmin()), unkept[0]
    else:
        row = _to_rows(accumulation, sent.view, sent.chunk)[0].abs()
        slot = int(row[idx[0]].argmax() if move == "drop" else row[idx[0]].argmin())
        new = min(unkept, key=lambda p: float(row[p])) if move == "far" else max(unkept, key=lambda p: float(row[p]))
    idx[0, slot] = new
    order = idx[0].argsort()
    idx[0] = idx[0][order]
    field = "codes" if hasattr(sent, "codes") else "vals"
    values = getattr(sent, field).clone()
    values[0] = values[0][order]
    return dataclasses.replace(sent, idx=idx, **{field: values})


def tie_gap(sent, moved, accumulation) -> float:
    """How far from a tie of `sent`'s top-k `moved` took its positions, on either side (sparseloco.selection_gaps;
    0 where the accumulation is not known: demo)."""
    if accumulation is None:
        return 0.0
    return max(float(side.max()) for side in selection_gaps(accumulation, sent, moved) if side.numel())


def replayed_once(monkeypatch, strategy) -> None:
    """From here on the strategy's class replays each (step, state before) once: the checks that follow weigh one
    replay against several tolerances (replays are bit for bit in one process, so each would give the same)."""
    cls, made = type(strategy), {}
    replay = cls.mine

    def mine(self, model, state, tokens, *, step):
        key = (step, None if state is None else state_digest(state))
        if key not in made:
            made[key] = replay(self, model, state, tokens, step=step)
        return copy.deepcopy(made[key])
    monkeypatch.setattr(cls, "mine", mine)


@EACH
def test_a_tolerance_weighs_a_tie_broken_otherwise_against_the_whole_file(name, dataset, tmp_path, monkeypatch):
    """Other kernels (another CPU's, a GPU's) can break a top-k tie the other way: a value of one parameter moves
    (bench/replay_tolerance.py: 3 % of a parameter's values, 0.6 % of the file, on the small preset at a fresh
    start), and what the miner keeps back moves with it. The values are weighed as one vector, so a tolerance above
    the file's share passes it, however large the parameter's own share; a tolerance below it does not, except at a
    sparseloco fresh start (FRESH_START_SLACK times it: such ties are many). The state after is weighed in a form
    the tie does not move, so a file that sends more than its replay and keeps back nothing less fails there. And
    under sparseloco both sides of a position moved must be near-ties of the replay's top-k: the value moved to a
    position no rounding would choose, or the largest given up for the next in line, within both rooms, fails
    (bench/steer_edge.py, `swap`)."""
    data = Dataset.open(dataset)  # the small preset: a file of ≈ 200 k values, where one moved is ≈ 0.3 % of it
    model = build_model("small", seed=0, vocab_size=data.vocab_size)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    bit_for_bit = strategy_of(FAST.replace(strategy=name))
    _, _, after_first = mine(bit_for_bit, model, data, 0, 1, None)
    files = {"carried": mine(bit_for_bit, model, data, 1, 1, copied(after_first)),
             "fresh": mine(bit_for_bit, model, data, 1, 1, None)}
    replayed_once(monkeypatch, bit_for_bit)
    for start, (file, before, after) in files.items():
        sent = read_sent(bit_for_bit, file, model)
        smallest = min((n for n in shapes if len(shapes[n]) == 2), key=lambda n: float(sent_values(sent[n]).norm()))
        accumulation = bit_for_bit.tie_free_state(after, sent)["error." + smallest] if name == "sparseloco" else None
        moves = {"tie": tie_broken_otherwise(sent[smallest], accumulation)}
        if accumulation is not None:
            moves |= {move: tie_broken_otherwise(sent[smallest], accumulation, move=move) for move in ("far", "drop")}
        moved = {move: {**sent, smallest: entry} for move, entry in moves.items()}
        of_file = values_difference(moved["tie"], sent)
        of_parameter = relative_difference(sent_values(moved["tie"][smallest]), sent_values(sent[smallest]))
        assert 0 < 3 * of_file < of_parameter  # demo: every parameter's values have unit norm, a share of √(#params)
        fresh_passes = start == "fresh" and bit_for_bit.FRESH_START_SLACK > 2
        slack = bit_for_bit.FRESH_START_SLACK if start == "fresh" else 1.0
        # a tolerance the values pass, and the positions too: the next in line is a tie within it (a real one within
        # rounding's scale, ≈ 5e-6; this one at its gap)
        passing = max((of_file * of_parameter) ** 0.5, 1.01 * tie_gap(sent[smallest], moves["tie"], accumulation))
        states_after = {(move, "kept back"): kept_back(after, moved[move], sent) for move in moved}
        states_after["tie", "as without the tie"] = after
        cases = [(passing, "tie", "kept back", True),
                 (of_file / 2, "tie", "kept back", fresh_passes),
                 (of_file / (2 * bit_for_bit.FRESH_START_SLACK), "tie", "kept back", False)]
        if name == "sparseloco":  # the same file from a miner that kept back what it would have without the tie:
            cases.append((1.01 * of_file / slack, "tie", "as without the tie", "state"))  # the values just pass
            # a position moved far from any tie on one side, what the miner keeps back and its values within both
            # rooms (the tolerance the tie passes, or its values' share): only the rule on positions refuses it
            for move in ("far", "drop"):
                tolerance = max(passing, 1.01 * values_difference(moved[move], sent) / slack)
                assert tie_gap(sent[smallest], moves[move], accumulation) > tolerance
                cases.append((tolerance, move, "kept back", "position"))
        buckets = {}  # what the miner puts depends on its state alone (every tolerance here is above 0): put once
        for n, (tolerance, move, state, passes) in enumerate(cases):
            hparams = FAST.replace(strategy=name, spot_check_tolerance=tolerance)
            strategy, state_after = strategy_of(hparams), states_after[move, state]
            if (move, state) not in buckets:
                buckets[move, state] = LocalBucket(tmp_path / f"miner-{start}-{len(buckets)}")
                answer(1, 1, seed="close", before=before, after=state_after, bucket=buckets[move, state],
                       hparams=hparams)
            near = strategy.write_gradient(1, 1, moved[move], model_hash="ab" * 16,
                                           state=commitment(before, state_after))
            reason = checker(strategy, model, data, buckets[move, state], 1, 1)(near)
            if passes is True:
                assert reason is None, (start, n, reason)
            elif passes == "state":
                assert reason.startswith(f"replaying its window from its committed state gives another state error."
                                         f"{smallest}"), (start, reason)
            elif passes == "position":
                assert reason == (f"replaying its window from its committed state: {smallest} keeps or drops 1 "
                                  f"position(s) no tie of its replay's top-k would (beyond {tolerance:g} of the "
                                  f"chunk's k-th largest accumulated value)"), (start, move, reason)
            else:
                assert reason.startswith("replaying its window from its committed state gives other values"), reason


def test_a_node_that_spot_checks_keeps_the_theta_a_check_made_again_replays_on(tmp_path):
    """A check left pending (no state put in time) is made again after window w + 2 closes, on the θ the file named:
    up to sync_max_lag windows before w. A node that checks keeps that many windows of θ (kept_windows); with the
    default 4 alone it would have pruned it, and the check made again would be skipped (a cheat that never answered
    would go unbanned)."""
    hparams = FAST.replace(strategy="sparseloco")  # spot checks on
    assert kept_windows(4, hparams.replace(spot_check_probability=0.0)) == 4  # nothing to keep where none are made
    for keep in (4, kept_windows(4, hparams)):
        store = StateStore(tmp_path / str(keep), keep_windows=keep)
        for window in range(8):  # what the node holds when it evaluates window 7 (θ_8 not yet saved)
            store.save_model(ModelState(window, window, {"w": torch.full((2,), float(window))}))
        made_again = 7 - 2 - hparams.sync_max_lag  # the file of window 5, on θ sync_max_lag windows older
        assert (store.parameters_at(made_again) is not None) == (keep > 4), keep


def test_a_report_s_record_of_commitments_round_trips_as_lists_of_four():
    recorded = {3: Recorded("a" * 64, "b" * 64, 1, "hotkey-3"), 7: Recorded(ZEROS, "c" * 64, 0, "")}
    report = EvaluationReport(5, 0, 5, 4.2, [3], {}, commitments=recorded, checks={7: ""})
    data = write_evaluation(report)
    assert json.loads(data)["commitments"]["3"] == ["a" * 64, "b" * 64, 1, "hotkey-3"]
    read = read_evaluation(data, window=5, validator=0)
    assert read.commitments == recorded and read.commitments[3].after == "b" * 64 and read.checks == {7: ""}
    document = json.loads(data)
    document["commitments"]["3"] = ["a" * 64, "b" * 64, -1, "hotkey-3"]  # a lag below 0
    with pytest.raises(InvalidFile, match="commitments malformed"):
        read_evaluation(json.dumps(document).encode(), window=5, validator=0)
    for key in ("²", "9" * 13):  # a digit int() refuses; a uid no chain has (and int() refuses 4300 digits)
        document["commitments"] = {key: ["a" * 64, "b" * 64, 1, ""]}
        with pytest.raises(InvalidFile, match="commitments malformed"):
            read_evaluation(json.dumps(document).encode(), window=5, validator=0)


def test_a_miner_starts_fresh_where_the_validators_holding_half_the_stake_did_not_record_its_last_file():
    """A validator whose watch missed a file (its bucket failed it) links nothing that continues its state: the
    miner's later files would score 0 there for good. It starts fresh (which always links) once validators holding
    at least half of all validators' stake recorded the window's files but not its file with the state it committed
    to. One whose report was not read in time, or that recorded nothing, counts as having recorded it."""
    def report(validator: int, recorded: dict[int, str]) -> EvaluationReport:
        return EvaluationReport(window=5, validator=validator, step=5, random_loss=1.0, peers=[], scores={},
                                commitments={uid: Recorded("b" * 64, after, 0, "") for uid, after in recorded.items()})

    mine, other = "a" * 64, "c" * 64
    has, lacks, idle = report(0, {7: mine, 8: other}), report(1, {8: other}), report(2, {})
    stakes = {0: 600.0, 1: 400.0}
    # a minority missed it: mended only in the windows of its period (the next test), which window 6 is not for 7
    assert Records(5, {0: has, 1: lacks}, stakes).unrecorded(7, mine) is None
    assert Records(5, {0: has, 1: lacks}, stakes).unrecorded(8, other) is None
    why = Records(5, {0: lacks, 1: has}, stakes).unrecorded(7, mine)  # the majority missed it
    assert why is not None and "validators [0] (60% of the stake)" in why and "window 5" in why
    assert Records(5, {0: has, 1: None}, stakes).unrecorded(7, other) is not None  # recorded with another state
    # half is enough; without stake anywhere, one validator one vote
    assert Records(5, {0: has, 1: lacks}, {0: 1.0, 1: 1.0}).unrecorded(7, mine) is not None
    assert Records(5, {0: has, 1: lacks, 3: report(3, {7: mine})}, {}).unrecorded(7, mine) is None
    # the majority's report not read in time (or not yet written), or recording nothing (checks off, or no records
    # of its own: it links anything): the minority that missed it cannot make the miner give up its state
    assert Records(5, {0: None, 1: lacks}, stakes | {0: 5000.0}).unrecorded(7, mine) is None
    assert Records(5, {1: lacks, 2: idle}, {1: 400.0, 2: 5000.0}).unrecorded(7, mine) is None
    assert Records(5, {1: lacks}, {1: 400.0, 2: 5000.0}).unrecorded(7, mine) is None  # 2 holds a permit, no report


def test_a_minority_s_miss_is_mended_within_its_period_and_cannot_reset_a_miner_more_often():
    """Validators holding a share s < 1/2 of the stake that missed a file: the miner starts fresh in the first
    window w + 1 ≡ −uid (mod P(s)), P(s) = 2^⌈log₂(MINORITY_RESET_WINDOWS / s)⌉. Played window by window as a
    miner node meets it (a validator that missed its file links nothing after it, so it misses every later one
    until the miner starts fresh): an honest miss is mended within P(s) < 2·R/s windows, and validators missing
    on purpose every window reset it at most once every R/S windows (R = MINORITY_RESET_WINDOWS)."""
    def report(validator: int, recorded: dict[int, str]) -> EvaluationReport:
        return EvaluationReport(window=0, validator=validator, step=0, random_loss=1.0, peers=[], scores={},
                                commitments={uid: Recorded("b" * 64, after, 0, "") for uid, after in recorded.items()})

    mine = "a" * 64
    rate = MINORITY_RESET_WINDOWS
    for share in (0.49, 0.25, 0.2, 0.1, 0.01, 1e-6):  # the least power of two at or above R / s
        period = reset_period(share)
        assert period & (period - 1) == 0 and rate / share <= period < 2 * rate / share
    for share in (0.45, 0.25, 0.1, 0.03):
        stakes = {0: 1.0 - share, 1: share}
        for uid in (0, 3, 12):
            def records(window: int, missed: bool) -> Records:  # of window − 1, read before mining `window`
                recorded = {99: mine} if missed else {uid: mine}  # another uid's: its watch missed this one
                return Records(window - 1, {0: report(0, {uid: mine}), 1: report(1, recorded)}, stakes)
            period = reset_period(share)
            assert all(records(w, missed=False).unrecorded(uid, mine) is None for w in range(1, 300))
            resets = [w for w in range(1, 4 * period) if records(w, missed=True).unrecorded(uid, mine) is not None]
            assert len(resets) >= 3 and min(b - a for a, b in zip(resets, resets[1:])) >= rate / share
            # a miss in any window: mended within P(s) < 2R/s windows, the pay lost meanwhile s a window
            waits = [next(w for w in resets if w >= start) - start for start in range(1, 2 * period)]
            assert max(waits) < reset_period(share) <= 2 * rate / share
            why = records(resets[0], missed=True).unrecorded(uid, mine)
            assert f"{share:.0%} of the stake" in why and "a minority's miss" in why
    # a coalition choosing, window by window, which of its validators miss and how its stake is spread among them
    # (its share at most S), beside an honest validator that records everything: resets at least R / S apart
    chooser = random.Random(0)
    for coalition in (0.45, 0.2, 0.05):
        resets = []
        for window in range(1, 3 * reset_period(coalition) + 1):
            split = [chooser.random() for _ in range(3)]
            stakes = {0: 1.0 - coalition} | {v: coalition * x / sum(split) for v, x in zip((1, 2, 3), split)}
            reports = {0: report(0, {5: mine})} | {v: report(v, {6: mine} if chooser.random() < 0.6 else {5: mine})
                                                   for v in (1, 2, 3)}
            if Records(window - 1, reports, stakes).unrecorded(5, mine) is not None:
                resets.append(window)
        assert resets and min(b - a for a, b in zip(resets, resets[1:])) >= rate / coalition
    # a share too small to weigh (R / s would overflow) mends nothing and raises nothing
    assert Records(5, {0: report(0, {7: mine}), 1: report(1, {8: mine})}, {0: 1.0, 1: 5e-324}).unrecorded(
        7, mine) is None


def test_a_draw_follows_the_closing_hash_at_the_network_s_rate():
    for probability in (0.1, 0.5):
        share = sum(drawn("hash-a", 7, uid, probability) for uid in range(4000)) / 4000
        assert abs(share - probability) < 0.03, (probability, share)
    picks = [{uid for uid in range(200) if drawn(seed, 7, uid, 0.5)} for seed in ("hash-a", "hash-b")]
    assert picks[0] != picks[1] and len(picks[0] & picks[1]) < 0.75 * len(picks[0])  # a new hash, other uids
    assert not any(drawn("hash-a", 7, uid, 0.0) for uid in range(100))
    assert all(drawn("hash-a", 7, uid, 1.0) for uid in range(100))


def test_a_state_digest_covers_names_dtypes_shapes_and_bytes():
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "t": torch.tensor([3.0], dtype=torch.float64)}
    digest = state_digest(state)
    assert digest == state_digest(copied(state)) != ZEROS and state_digest(None) == ZEROS
    for other in ({**state, "a": state["a"].reshape(3, 2)}, {**state, "t": state["t"].float()},
                  {"b": state["a"], "t": state["t"]}, {**state, "a": state["a"] + 1e-7}):
        assert state_digest(other) != digest


def test_a_state_digest_is_its_definition_whatever_the_threads_and_the_memory_held(monkeypatch):
    """The digest is spelled out for other implementations: sha256 over, in name order, each tensor's compact JSON
    [name, dtype, shape], then the sha256 of every STATE_DIGEST_CHUNK bytes of its data; the pool's threads and the
    bytes it holds at once change only the time it takes."""
    import hashlib

    import templar_lib.spot_check as spot_check
    from templar_lib.hparams import STATE_DIGEST_CHUNK as chunk

    state = {"b": torch.arange(chunk // 4 * 2 + 5, dtype=torch.float32),  # two whole chunks and a piece
             "a": torch.ones(3, 2), "empty": torch.zeros(0), "adam_t": torch.tensor([7.0], dtype=torch.float64)}
    expected = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        expected.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)], separators=(",", ":")).encode())
        data = tensor.numpy().tobytes()
        for start in range(0, len(data), chunk):
            expected.update(hashlib.sha256(data[start:start + chunk]).digest())
    for threads, held in ((1, 1), (3, 1 << 30), (16, chunk)):
        monkeypatch.setattr(spot_check, "_DIGEST_THREADS", threads)
        monkeypatch.setattr(spot_check, "_DIGEST_HELD_BYTES", held)
        assert state_digest(state) == expected.hexdigest(), (threads, held)
    last = state["b"].clone()
    last[-1] += 1  # a byte of the last chunk
    assert state_digest({**state, "b": last}) != expected.hexdigest()
    # names are framed: an empty tensor's header cannot pass for part of the next name (NUL-separated it could)
    glued = "a\0torch.float32\0(0,)\0b"
    assert state_digest({"a": torch.zeros(0), "b": state["a"]}) != state_digest({glued: state["a"]})


def test_a_miner_state_file_is_validated():
    state = {"m.w": torch.ones(2, 3), "adam_t": torch.tensor([4.0], dtype=torch.float64)}
    shapes = {"m.w": (2, 3), "adam_t": (1,)}
    expected = dict(window=5, uid=2, side="before", shapes=shapes, float64=frozenset({"adam_t"}))
    data = write_miner_state(5, 2, "before", state)
    read = read_miner_state(data, **expected)
    assert state_digest(read) == state_digest(state)
    refusals = {
        "window": dict(window=6), "uid": dict(uid=3), "side": dict(side="after"),
        "state tensors": dict(shapes={"m.w": (2, 3)}), "is not a state tensor": dict(shapes={**shapes, "m.w": (3, 2)}),
        "F64 \\[1\\] is not": dict(float64=frozenset()),  # twice the bytes where float32 is the state's
    }
    for reason, change in refusals.items():
        with pytest.raises(InvalidFile, match=reason):
            read_miner_state(data, **(expected | change))
    for bad, reason in (({**state, "m.w": torch.ones(2, 3, dtype=torch.float16)}, "not allowed"),
                        ({**state, "m.w": torch.ones(2, 3, dtype=torch.float64)}, "is not a state tensor"),
                        ({**state, "m.w": torch.full((2, 3), float("nan"))}, "non-finite")):
        with pytest.raises(InvalidFile, match=reason):
            read_miner_state(write_miner_state(5, 2, "before", bad), **expected)
    with pytest.raises(InvalidFile, match="exceeds the limit"):
        read_miner_state(data + b" " * (2 << 20), **expected)


@EACH
def test_where_the_network_spot_checks_a_file_must_commit_to_its_state(name, model_and_data):
    model, data = model_and_data
    strategy = strategy_of(FAST.replace(strategy=name))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mined = strategy.mine(model, None, data.tokens(data.miner_pages(0, 1, 2)), step=0)
    plain = strategy.write_gradient(0, 1, mined.sent)
    with pytest.raises(InvalidFile, match="commits to no miner state"):
        strategy.read_gradient(plain, window=0, uid=1, shapes=shapes)
    committed = strategy.write_gradient(0, 1, mined.sent, state=commitment(None, mined.state))
    assert strategy.read_gradient(committed, window=0, uid=1, shapes=shapes).state == (ZEROS, state_digest(
        mined.state))
    off = strategy_of(FAST.replace(strategy=name, spot_check_probability=0.0))  # another protocol: its own hash
    assert off.hparams.protocol_hash() != strategy.hparams.protocol_hash()
    assert off.hparams.protocol_hash() == FAST.replace(strategy=name).replace(
        spot_check_probability=0.0, spot_check_ban_windows=7).protocol_hash()  # how long a ban lasts is not
    assert strategy.hparams.replace(spot_check_tolerance=0.01).protocol_hash() != strategy.hparams.protocol_hash()
    assert off.hparams.replace(spot_check_tolerance=0.01).protocol_hash() == off.hparams.protocol_hash()  # no checks
    with pytest.raises(HParamsError, match="room a miner can steer its file in"):  # steering paid 3.3× at 0.1
        strategy.hparams.replace(spot_check_tolerance=0.1)
    assert HParams(spot_check_tolerance=0.1).protocol_hash() == HParams().protocol_hash()  # checks off: not used
    assert HParams().protocol_hash() == HParams(spot_check_tolerance=0.0).protocol_hash()  # the default: off
    assert off.read_gradient(off.write_gradient(0, 1, mined.sent), window=0, uid=1, shapes=shapes).state is None
    assert parameters_of(model)  # the model is untouched by it all


def test_a_node_starts_fresh_where_the_validators_did_not_record_its_last_file(dataset, tmp_path):
    """The node path: a uid whose file of the last window the validator's report does not record (its watch missed
    it: the file landed, so nothing else tells the node) mines from no state; one it recorded carries its state.
    A state after that window lost in a crash is computed again from no state too, as it was mined."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco", spot_check_tolerance=1e-3)  # a check puts the state after too
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    mine_window(0, [1, 2], model=model, step=0, store=store, dataset=data, gradients=gradients, hparams=hparams)
    commitments = {uid: committed(gradients.get(gradient_key(0, uid)), window=0, uid=uid, hparams=hparams)
                   for uid in (1, 2)}
    seen = EvaluationReport(0, 0, 0, 1.0, [], {}, commitments={1: Recorded(ZEROS, commitments[1].after, 0, "")})
    results = {result.uid: result for result in mine_window(
        1, [1, 2], model=model, step=1, store=store, dataset=data, gradients=gradients, hparams=hparams,
        records=Records(0, {0: seen}, {0: 1000.0}))}
    assert results[1].momentum == "carried" and results[2].momentum.startswith(
        "zeros (validators [0] (100% of the stake) did not record its file of window 0")
    before = {uid: committed(gradients.get(gradient_key(1, uid)), window=1, uid=uid, hparams=hparams).before
              for uid in (1, 2)}
    assert before == {1: commitments[1].after, 2: ZEROS}
    store.writer.flush()
    store.save_model(ModelState(1, 1, {n: p.detach().clone() for n, p in model.named_parameters()}), background=False)
    (tmp_path / "state" / "momentum-2-1.safetensors").unlink()
    (tmp_path / "state" / "momentum-2-1.pending").write_bytes(b"")
    restarted = StateStore(tmp_path / "state", writer=WriteBehind())
    # its file started fresh: no state before is loaded or put (the check replays from none), the state after is
    assert answer_spot_checks(1, [2], seed="close-1", store=restarted, gradients=gradients, hparams=hparams,
                              model=model, dataset=data) == {2: [miner_state_key(1, 2, "after")]}
    strategy = strategy_of(hparams)
    put = read_miner_state(gradients.get(miner_state_key(1, 2, "after")), window=1, uid=2, side="after",
                           shapes=strategy.state_shapes(parameters_of(model)), float64=strategy.STATE_FLOAT64)
    assert state_digest(put) == committed(gradients.get(gradient_key(1, 2)), window=1, uid=2, hparams=hparams).after


def test_a_validator_that_missed_a_file_mends_it_from_the_record_validators_holding_half_the_stake_agree_on():
    """Records.mendable: the state after (and hotkey) of a uid's file that validators holding at least half of all
    validators' stake recorded in good standing, where the draw did not pick the file (its check, which the
    validator that missed it cannot make, might yet fail)."""
    def report(validator: int, recorded: dict[int, str], hotkey: str = "hk") -> EvaluationReport:
        return EvaluationReport(window=5, validator=validator, step=5, random_loss=1.0, peers=[], scores={},
                                commitments={u: Recorded("b" * 64, after, 0, hotkey) for u, after in recorded.items()})

    mine, other, rate = "a" * 64, "c" * 64, 0.5
    uid = reset_period(0.2) - 6  # mining window 6 is in the schedule of a 20 % share's miss
    free, picked = (next(f"close-{i}" for i in range(200) if drawn(f"close-{i}", 5, uid, rate) == want)
                    for want in (False, True))
    stakes = {0: 500.0, 1: 300.0, 2: 200.0}
    lacks = report(2, {uid + 1: other})  # its watch missed the uid's file

    def records(reports, seed=free):
        return Records(5, reports, stakes, seed)
    mended = records({0: report(0, {uid: mine}), 1: report(1, {uid: mine}), 2: lacks}).mendable(uid, rate)
    assert mended is not None and (mended.after, mended.hotkey) == (mine, "hk")
    assert records({0: report(0, {uid: mine}), 1: report(1, {uid: other}), 2: lacks}).mendable(uid, rate).after == mine
    for unmendable in (
            records({0: report(0, {uid: mine}), 1: report(1, {uid: mine}), 2: lacks}, seed=picked),  # drawn
            records({0: report(0, {uid: mine}), 1: report(1, {uid: mine}), 2: lacks}, seed=None),  # no hash
            records({0: None, 1: report(1, {uid: mine}), 2: lacks}),  # 300 of 1000: a report not read is no record
            records({0: report(0, {uid: mine}), 1: report(1, {uid: other}), 2: report(2, {uid: other})}),  # a tie
            records({0: None, 1: report(1, {uid: mine}), 2: report(2, {uid: mine}, "other")})):  # two hotkeys
        assert unmendable.mendable(uid, rate) is None
    # only reports that hold the uid in good standing count: one that bans it, or whose check of it failed or is
    # pending, does not (the others' ban reaches the validator that missed the file)
    banning = dataclasses.replace(report(0, {uid: mine}), scores={uid: zero_score(uid, f"{BANNED} 60: failed")})
    for standing in (banning, dataclasses.replace(report(0, {uid: mine}), checks={uid: "replaying … gives another"}),
                     dataclasses.replace(report(0, {uid: mine}), checks={uid: PENDING + "no state put"})):
        assert records({0: standing, 1: report(1, {uid: mine}), 2: lacks}).mendable(uid, rate) is None
    # the miner's schedule stays the net under the mend (its reads of the reports may differ from the validators')
    why = records({0: report(0, {uid: mine}), 1: report(1, {uid: mine}), 2: lacks}).unrecorded(uid, mine)
    assert why is not None and "a minority's miss" in why


def test_a_file_that_links_only_to_the_others_record_of_the_last_file_is_recorded_and_paid(dataset, tmp_path):
    """record_commitments with `mend`, on real files: a validator whose record of window 0 lacks the uid's file (its
    watch missed it) records and pays the uid's file of window 1 where the record the others agreed on links it (the
    same hotkey), and refuses it otherwise; without a report of window 0 at all, the agreed record pays it too."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco", spot_check_probability=0.5)
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    for window in (0, 1):
        mine_window(window, [1], model=model, step=window, store=store, dataset=data, gradients=gradients,
                    hparams=hparams)
    last = committed(gradients.get(gradient_key(0, 1)), window=0, uid=1, hparams=hparams)
    watch = Watch(1, blocks_per_window=hparams.blocks_per_window, state=LocalBucket(tmp_path / "validator"),
                  peers=PeerBuckets.of({1: gradients}), uids=[1], max_bytes=hparams.max_gradient_bytes)
    watch.poll(hparams.blocks_per_window + 1)

    def record(previous, mend):
        return record_commitments(1, watch=watch, uids=[1], hparams=hparams, previous=previous, hotkeys={1: "hk"},
                                  lags_of=lambda files: dict.fromkeys(files, 0), mend=mend)
    agreed = Recorded(ZEROS, last.after, 0, "hk")
    recorded, reasons = record({}, None)
    assert 1 not in recorded and reasons[1].startswith("state: it continues a state no file of window 0")
    recorded, reasons = record({}, {1: agreed}.get)
    assert recorded[1].before == last.after and 1 not in reasons
    for wrong in (agreed._replace(hotkey="another"), agreed._replace(after="d" * 64)):
        assert 1 not in record({}, {1: wrong}.get)[0]
    # a record of its own with another state after (a miner showing validators different files) is no miss
    assert 1 not in record({1: agreed._replace(after="d" * 64)}, {1: agreed}.get)[0]
    assert record(None, None)[1][1].startswith("state: this validator has no record of window 0")  # unpaid
    recorded, reasons = record(None, {1: agreed}.get)
    assert 1 in recorded and 1 not in reasons
    for wrong in (agreed._replace(hotkey="another"), agreed._replace(after="d" * 64)):  # no records of its own, and
        recorded, reasons = record(None, {1: wrong}.get)  # the others agree on another state: not taken on trust
        assert 1 not in recorded and reasons[1].startswith("state: it continues another state than the one")
    # a re-run (a retry, a backfill) takes each decision its published report made, whatever the others say now
    files = file_commitments(watch, hparams=hparams)
    for previous, mend in ((None, {1: agreed}.get), (None, {1: agreed._replace(after="d" * 64)}.get), (None, None),
                           ({}, None), ({}, {1: agreed}.get)):
        recorded, reasons = record(previous, mend)
        done = EvaluationReport(1, 0, 1, 1.0, [], {1: zero_score(1, reasons[1]) if 1 in reasons else Score(1, 0.5, 1)},
                                commitments=recorded)
        again = spot_checks.mender(
            1, files=files, previous=None if previous is None else EvaluationReport(0, 0, 0, 1.0, [], {},
                                                                                 commitments=previous),
            others=lambda window: None, chain=None, hparams=hparams, published=lambda: done)
        assert record(previous, again) == (recorded, reasons), (previous, mend)


def test_a_validator_whose_watch_missed_a_file_pays_the_next_one_through_the_others_reports(dataset, tmp_path,
                                                                                              monkeypatch):
    """evaluate_window with `others` (as the validators asset and the simulation run it): the validator holding 20 %
    of the stake recorded nothing of the miner's file of window 0; the others (80 %) did, and the draw of window 0's
    closing hash did not pick it. Its file of window 1 is recorded and scored, not zeroed for a state nobody it knows
    committed to; without the others' reports (none given, their reader failing, or not ready in time), or where
    the others' reports ban the uid, it is zeroed."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco", spot_check_probability=0.5)
    bpw = hparams.blocks_per_window
    for attempt in range(100):  # a chain whose window 0 closes with a hash that does not draw the miner
        chain = LocalChain(tmp_path / f"chain-{attempt}.sqlite", blocks_per_window=bpw, secret=f"mend-{attempt}")
        validators = [chain.register(hotkey=f"v{i}", stake=stake, validator_permit=True)
                      for i, stake in enumerate((500.0, 300.0, 200.0))]
        miner = chain.register(hotkey="miner")
        chain.advance(2 * bpw)  # windows 0 and 1 have closed
        if not drawn(chain.block_hash(bpw), 0, miner, hparams.spot_check_probability):
            break
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    for window in (0, 1):
        mine_window(window, [miner], model=model, step=0, store=store, dataset=data, gradients=gradients,
                    hparams=hparams)
    after = committed(gradients.get(gradient_key(0, miner)), window=0, uid=miner, hparams=hparams).after
    reports = LocalBucket(tmp_path / "reports")  # every validator's, as on a local network

    def publish(validator: int, recorded: dict[int, Recorded], **fields) -> None:
        reports.put(evaluation_key(0, validator), write_evaluation(dataclasses.replace(
            EvaluationReport(0, validator, 0, 1.0, [], {}, commitments=recorded), **fields)))
    for validator in validators[:2]:
        publish(validator, {miner: Recorded(ZEROS, after, 0, "miner")})
    missing = validators[2]
    publish(missing, {miner + 1: Recorded(ZEROS, after, 0, "other")})  # its watch missed the miner's file

    def evaluate(name: str, others, rerun: bool = False):
        if not rerun:  # a first run: no report of window 1 of its own yet
            reports.delete(evaluation_key(1, missing))
        watch = Watch(1, blocks_per_window=bpw, state=LocalBucket(tmp_path / name),
                      peers=PeerBuckets.of({miner: gradients}), uids=[miner], max_bytes=hparams.max_gradient_bytes)
        watch.poll(bpw + 1)
        state = ModelState(1, 0, {n: p.detach().clone() for n, p in model.named_parameters()})
        return evaluate_window(1, chain=chain.as_uid(missing), model=model, state=state, dataset=data, watch=watch,
                               own_bucket=reports, hparams=hparams, others=others).report

    def others(window: int) -> Records:
        return validator_records(window, metagraph=chain.metagraph(), peers=PeerBuckets.of({}), shared=reports)

    def failing(window: int) -> Records:
        raise RuntimeError("the reports' reader failed")

    def slow(window: int) -> Records:
        time.sleep(1.0)
        return others(window)
    monkeypatch.setattr(spot_checks, "MEND_WAIT_SECONDS", 0.2)
    mended = evaluate("mended", others)
    assert miner in mended.commitments and not mended.scores[miner].reason
    # a re-run takes the mends its published report made, whatever its reads give now: the same bytes
    assert write_evaluation(evaluate("rerun", failing, rerun=True)) == write_evaluation(mended)
    for name, reader in (("alone", None), ("failing", failing), ("slow", slow)):  # nothing mended, no more
        alone = evaluate(name, reader)
        assert miner not in alone.commitments and alone.scores[miner].reason.startswith("state: it continues a")
    publish(validators[0], {miner: Recorded(ZEROS, after, 0, "miner")},
            scores={miner: zero_score(miner, f"{BANNED} 60: failed the spot check of window -1: …")})
    banned = evaluate("banned", others)  # 300 of 1000 in good standing: no mend
    assert miner not in banned.commitments and banned.scores[miner].reason.startswith("state: it continues")


def test_a_file_after_a_window_its_validator_did_not_watch_is_recorded_and_the_next_one_paid(dataset, tmp_path):
    """The validator was down during window 1 and evaluates it late: its watch never looked, so it scores nobody
    there and its report says so (nobody missed). The miner carried its state on meanwhile; its file of window 2 is
    recorded (not paid: nothing links it), and its file of window 3 links to that record and is paid. A report of
    window 1 that recorded nothing but counted as a record would have left every later file unlinked for good."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco", spot_check_probability=1e-9)  # records kept, nobody drawn
    bpw = hparams.blocks_per_window
    chain = LocalChain(tmp_path / "chain.sqlite", blocks_per_window=bpw)
    validator = chain.register(hotkey="v", stake=100.0, validator_permit=True)
    miner = chain.register(hotkey="miner")
    chain.advance(4 * bpw)  # windows 0 to 3 have closed
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    reports, seen = LocalBucket(tmp_path / "reports"), LocalBucket(tmp_path / "seen")

    def evaluate(window: int, *, watched: bool) -> EvaluationReport:
        mine_window(window, [miner], model=model, step=0, store=store, dataset=data, gradients=gradients,
                    hparams=hparams)
        watch = Watch(window, blocks_per_window=bpw, state=seen, peers=PeerBuckets.of({miner: gradients}),
                      uids=[miner], max_bytes=hparams.max_gradient_bytes)
        if watched:
            watch.poll(window * bpw + 1)
        state = ModelState(window, 0, {n: p.detach().clone() for n, p in model.named_parameters()})
        return evaluate_window(window, chain=chain.as_uid(validator), model=model, state=state, dataset=data,
                               watch=watch, own_bucket=reports, hparams=hparams).report
    first = evaluate(0, watched=True)
    assert miner in first.commitments and not first.scores[miner].reason
    down = evaluate(1, watched=False)
    assert not down.watched and down.scores == {} and down.peers == [] and down.commitments == {}
    back = evaluate(2, watched=True)
    assert miner in back.commitments and back.scores[miner].reason.startswith("state: this validator has no record")
    paid = evaluate(3, watched=True)
    assert miner in paid.commitments and not paid.scores[miner].reason and paid.peers == [miner]


def test_a_window_a_node_did_not_mine_is_not_answered_but_one_an_earlier_attempt_put_a_file_of_is(dataset,
                                                                                                    tmp_path):
    """A miner node catching up after downtime does not mine a window that had closed (the gradients asset): each uid
    without a file of it is marked unmined, and no check of that window is answered for it (nothing was recorded,
    so none can be asked; a state put is up to twice the state's size). A uid an earlier attempt of the run put a
    file of is not marked: validators may have recorded that file, and its check is answered."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco", spot_check_probability=1.0)  # every file drawn
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    mine = functools.partial(mine_window, model=model, step=0, store=store, dataset=data, gradients=gradients,
                             hparams=hparams)
    mine(0, [1, 2])
    mine(1, [2])  # uid 2's earlier attempt put its file of window 1 before the window closed
    assert skip_window(1, [1, 2], store=store, gradients=gradients, hparams=hparams) == [1]
    put = answer_spot_checks(1, [1, 2], seed="ab" * 32, store=store, gradients=gradients, hparams=hparams,
                             model=model, dataset=data)
    assert sorted(put) == [2] and gradients.exists(miner_state_key(1, 2, "before"))
    assert not gradients.exists(miner_state_key(1, 1, "before"))
    assert mine(2, [1])[0].momentum == "zeros"  # nothing of window 1 to carry on from


def test_a_node_hashes_its_state_once_a_window_and_commits_to_the_same_digests(dataset, tmp_path, monkeypatch):
    """A node that keeps its state in memory (a resident node's write-behind) takes the digest of its state before a
    window from the one it committed to after the last window, where the load handed over that very state: one
    digest a window instead of two, and files byte-identical to a node that hashes both (no write-behind). A state
    handed to a spot check's answer first is loaded again from its file, and hashed again."""
    data = Dataset.open(dataset)
    hparams = FAST.replace(strategy="sparseloco", spot_check_probability=0.5)
    digests = []
    monkeypatch.setattr(miner_role, "state_digest", lambda state: digests.append(state) or state_digest(state))
    files, hashed = {}, {}
    for name, writer in (("behind", WriteBehind()), ("direct", None)):
        model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
        store, gradients = StateStore(tmp_path / name, writer=writer), LocalBucket(tmp_path / f"{name}-gradients")
        digests.clear()
        for window in range(4):
            mine_window(window, [1, 2], model=model, step=0, store=store, dataset=data, gradients=gradients,
                        hparams=hparams)
            if window == 2 and writer is not None:  # a check's answer takes uid 2's state first
                assert store.load_momentum(2, 2) is not None and 2 not in writer.digests  # nothing held after
        files[name] = [gradients.get(gradient_key(w, uid)) for w in range(4) for uid in (1, 2)]
        hashed[name] = sum(state is not None for state in digests)
    assert files["behind"] == files["direct"]
    assert hashed["direct"] == 2 * 8 - 2 and hashed["behind"] == hashed["direct"] - 5  # windows 1-3, less the one


def test_a_node_mends_a_minority_s_miss_in_a_window_of_its_period(dataset, tmp_path):
    """The node path with two validators: the one holding 10 % of the stake missed the files of uids 1 and
    P(0.1) − 1 (its report records another uid's); in window 1, which is in that share's schedule for the second uid
    only, the second starts fresh and the first carries its state on."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco")
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    uids = [1, reset_period(0.1) - 1]  # window 1 + uid ≡ 0 (mod P) for the second
    mine_window(0, uids, model=model, step=0, store=store, dataset=data, gradients=gradients, hparams=hparams)
    recorded = {uid: Recorded(ZEROS, committed(gradients.get(gradient_key(0, uid)), window=0, uid=uid,
                                               hparams=hparams).after, 0, "") for uid in uids}
    reports = {0: EvaluationReport(0, 0, 0, 1.0, [], {}, commitments=recorded),
               1: EvaluationReport(0, 1, 0, 1.0, [], {}, commitments={9: recorded[1]})}
    results = {result.uid: result for result in mine_window(
        1, uids, model=model, step=1, store=store, dataset=data, gradients=gradients, hparams=hparams,
        records=Records(0, reports, {0: 900.0, 1: 100.0}))}
    assert results[1].momentum == "carried"
    assert results[uids[1]].momentum.startswith("zeros (validators [1] (10% of the stake)") and \
        "a minority's miss" in results[uids[1]].momentum
    assert committed(gradients.get(gradient_key(1, uids[1])), window=1, uid=uids[1], hparams=hparams).before == ZEROS


def test_a_node_answers_from_its_state_store_and_restarts_where_its_last_file_is_gone(dataset, tmp_path):
    """The node path (roles.miner, a write-behind store whose mining updates states in place): what it puts for a
    drawn window replays to its file; a miner whose previous file is not in its bucket starts from no state, since a
    check would refuse a state that continues a file nobody saw."""
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    hparams = FAST.replace(strategy="sparseloco")
    store, gradients = StateStore(tmp_path / "state", writer=WriteBehind()), LocalBucket(tmp_path / "gradients")
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    files = {}
    for window in (0, 1):
        [result] = mine_window(window, [1], model=model, step=window, store=store, dataset=data,
                               gradients=gradients, hparams=hparams)
        files[window] = gradients.get(result.key)
    assert answer_spot_checks(1, [1], seed="close-1", store=store, gradients=gradients, hparams=hparams) == {
        1: [miner_state_key(1, 1, "before")]}
    # asked again a window on (late: for a node that was down when asked), an answer in the bucket is not put again;
    # one that is not there is
    late = functools.partial(answer_spot_checks, 1, [1], seed="close-1", store=store, gradients=gradients,
                             hparams=hparams, late=True)
    assert late() == {}
    gradients.delete(miner_state_key(1, 1, "before"))
    assert late() == {1: [miner_state_key(1, 1, "before")]}
    tokens = data.tokens(data.miner_pages(1, 1, hparams.pages_per_window))
    assert check(1, 1, hparams=hparams, model=model, theta=theta, step=1, tokens=tokens, scored=files[1],
                 fetch=lambda key, limit: gradients.get(key, max_bytes=limit)) is None
    assert committed(files[1], window=1, uid=1, hparams=hparams).before == committed(
        files[0], window=0, uid=1, hparams=hparams).after  # the node continues its last file's state
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def starts_fresh(window: int) -> bool:
        [result] = mine_window(window, [1], model=model, step=window, store=store, dataset=data,
                               gradients=gradients, hparams=hparams)
        state = strategy_of(hparams).read_gradient(gradients.get(result.key), window=window, uid=1,
                                                   shapes=shapes).state
        return result.momentum.startswith("zeros (its previous file is missing or was late") and state[0] == ZEROS
    gradients.delete(gradient_key(1, 1))
    assert starts_fresh(2)  # its file of window 1 is gone
    assert not starts_fresh(3)  # it continues window 2's
    mark_late(3, [1], store=store)  # window 3's file landed after the close: no validator saw it
    assert starts_fresh(4)
    store.writer.flush()
    # the state after window 4 (mined from zeros) is lost in a crash before its write landed; asked for it, the node
    # computes it again as window 4 was mined, from zeros again, so it hashes to what the file committed to
    store.save_model(ModelState(4, 4, theta), background=False)
    (tmp_path / "state" / "momentum-1-4.safetensors").unlink()
    (tmp_path / "state" / "momentum-1-4.pending").write_bytes(b"")
    restarted = StateStore(tmp_path / "state", writer=WriteBehind())
    tolerant = hparams.replace(spot_check_tolerance=1e-3)
    assert answer_spot_checks(4, [1], seed="close-4", store=restarted, gradients=gradients, hparams=tolerant,
                              model=model, dataset=data) == {1: [miner_state_key(4, 1, side) for side in
                                                                 ("before", "after")]}
    strategy = strategy_of(hparams)
    put = read_miner_state(gradients.get(miner_state_key(4, 1, "after")), window=4, uid=1, side="after",
                           shapes=strategy.state_shapes(theta), float64=strategy.STATE_FLOAT64)
    assert state_digest(put) == committed(gradients.get(gradient_key(4, 1)), window=4, uid=1, hparams=hparams).after
