"""The roles end to end on a LocalChain and local buckets, and the adversary suite (tiny model, CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.chain import LocalChain
from templar_lib.checkpoints import latest_checkpoint
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.simulate import ADVERSARIES, parse_adversaries, run_network
from templar_lib.simulate.adversaries import OPEN, SPOT_CHECKED
from templar_lib.spot_check import values_difference
from templar_lib.strategies import strategy_of
from templar_lib.wire import gradient_key, read_aggregation

# a few windows instead of thousands: full learning rate from the start, two pages of 2 × 128 tokens per miner
FAST = HParams(learning_rate=2e-3, warmup_steps=0, pages_per_window=2, batch_size=4, checkpoint_frequency=2)


def test_two_windows_end_to_end_write_every_artifact(dataset, tmp_path):
    report = run_network(dataset, tmp_path, miners=3, windows=2, hparams=FAST, random_page_count=2)
    gradients, aggregator = LocalBucket(tmp_path / "gradients"), LocalBucket(tmp_path / "aggregator")
    for window in (0, 1):
        for uid in (1, 2, 3):
            assert gradients.exists(f"gradient-{window}-{uid}.safetensors")
        peers = json.loads(gradients.get(f"peers_{window}.json"))
        evaluation = json.loads(gradients.get(f"evaluation-{window}-0.json"))
        assert peers["uids"] == report.windows[window].peers and evaluation["peers"] == peers["uids"]
        assert set(peers["sha256"]) == {str(uid) for uid in peers["uids"]} and peers["signature"]
        assert evaluation["seed_block"] == (window + 1) * FAST.blocks_per_window
        assert set(evaluation["uids"]) == {"1", "2", "3"}
        assert all(row["losses"]["own_before"] > 0 for row in evaluation["uids"].values())
        shapes = {n: tuple(t.shape) for n, t in latest_checkpoint(aggregator).parameters.items()}
        aggregation = read_aggregation(aggregator.get(f"aggregation-{window}.safetensors"), window=window,
                                       shapes=shapes)
        assert aggregation.peers == peers["uids"] and aggregation.step == window
    assert latest_checkpoint(aggregator).window == 2  # checkpoint_frequency 2: θ_2 published
    chain = LocalChain(tmp_path / "chain.sqlite")
    assert chain.weights()[0] == pytest.approx(report.final_weights)
    assert sum(report.final_weights.values()) == pytest.approx(1.0)
    assert report.roles == {1: "honest", 2: "honest", 3: "honest"}


def test_network_runs_are_deterministic(dataset, tmp_path):
    first = run_network(dataset, tmp_path / "a", miners=3, windows=2, hparams=FAST, random_page_count=2)
    second = run_network(dataset, tmp_path / "b", miners=3, windows=2, hparams=FAST, random_page_count=2)
    assert [w.scores for w in first.windows] == [w.scores for w in second.windows]
    assert first.final_weights == second.final_weights
    for window in (0, 1):
        assert (tmp_path / "a" / "aggregator" / f"aggregation-{window}.safetensors").read_bytes() == \
            (tmp_path / "b" / "aggregator" / f"aggregation-{window}.safetensors").read_bytes()


# Each attack at the fraction it is meant for, in the production order (templar_lib.schedule), 4 windows: the model
# attacks at 2 of 5 miners, a majority attack at 3 of 5, the rest at 1 of 5. Kinds that are honest in their first
# window by construction (a replay of its first gradient, training on θ three windows old) run 8, so what they earned
# honestly has worn off. The same rows, longer, are bench/adversaries.py's (docs/RELIABILITY.md has the table).
ATTACKS = {"sign_flip": 2, "scale": 2, "noise": 2, "swap_after_score": 2, "majority_scale": 3, "majority_shrink": 3,
           "copy": 1, "replay": 1, "free_rider": 1, "wrong_data": 1, "lagging": 1, "missing": 1, "malformed": 1,
           "backdate_copy": 1, "late_combine": 1, "sybil_mean": 1, "teach_random": 1, "lazy": 1, "thin": 1,
           "slow_endpoint": 2}
SLOW_TO_WEAR_OFF = {"replay", "lagging"}
# doing the assigned work plus something useless: paid per compute below an honest miner, not nothing
PAID_PER_COMPUTE = {"lazy", "thin", "teach_random"}


STRATEGIES = {"demo": FAST, "sparseloco": FAST.replace(strategy="sparseloco")}


@pytest.fixture(scope="module")
def honest_runs(dataset, tmp_path_factory):
    """honest_runs(strategy, miners, windows): the all-honest network every attack is measured against, made once."""
    made = {}

    def honest(strategy: str, miners: int, windows: int):
        if (strategy, miners, windows) not in made:
            made[strategy, miners, windows] = run_network(
                dataset, tmp_path_factory.mktemp(f"honest-{strategy}-{miners}-{windows}"), miners=miners,
                windows=windows, hparams=STRATEGIES[strategy], random_page_count=2)
        return made[strategy, miners, windows]
    return honest


def progress(report) -> float:
    return report.initial_held_out_loss - report.windows[-1].held_out_loss


def weight_per_compute(report, uids) -> float:
    weight = sum(w.weights.get(uid, 0.0) for w in report.windows for uid in uids)
    compute = sum(w.compute[uid] for w in report.windows for uid in uids)
    return weight / compute if compute else (float("inf") if weight > 0 else 0.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", [kind for kind in ADVERSARIES if kind not in OPEN and kind not in SPOT_CHECKED])
def test_each_attack_in_production_order_keeps_progress_and_earns_nothing(dataset, tmp_path, honest_runs, kind,
                                                                         strategy):
    """Progress is against the network of 5 honest miners under demo (a sign step does not grow with the peers), and
    under sparseloco against the honest miners of this network alone (uids 1..h, the same pages): its outer step is
    the mean over the peers that chose each position, so each miner kept out costs its own share and no more
    (docs/RELIABILITY.md)."""
    windows = 8 if kind in SLOW_TO_WEAR_OFF else 4
    report = run_network(dataset, tmp_path, miners=5, windows=windows, adversaries={kind: ATTACKS[kind]},
                         hparams=STRATEGIES[strategy], random_page_count=2)
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    cheats = [uid for uid, role in report.roles.items() if role != "honest"]
    last = report.windows[-1]
    reference = honest_runs(strategy, 5 if strategy == "demo" else len(honest), windows)
    assert progress(report) >= 0.9 * progress(reference), (kind, progress(report), progress(reference))
    assert all(last.weights.get(uid, 0.0) > 0 for uid in honest), (kind, last.weights)
    if kind in PAID_PER_COMPUTE:
        assert weight_per_compute(report, cheats) <= weight_per_compute(report, honest), (kind, last.weights)
    else:
        assert sum(last.weights.get(uid, 0.0) for uid in cheats) <= 0.05, (kind, last.weights, last.reasons)


@pytest.fixture(scope="module")
def open_runs(dataset, tmp_path_factory):
    """open_runs(kind, strategy): one of five miners of an OPEN kind (a greedy file at its honest file's size, or
    half the work on every page), 5 windows, made once per kind and strategy."""
    made = {}

    def run(kind: str, strategy: str = "sparseloco"):
        if (kind, strategy) not in made:
            made[kind, strategy] = run_network(dataset, tmp_path_factory.mktemp(f"{kind}-{strategy}"), miners=5,
                                               windows=5, adversaries={kind: 1}, hparams=STRATEGIES[strategy],
                                               random_page_count=2)
        return made[kind, strategy]
    return run


def test_one_outscoring_miner_leaves_the_honest_ones_in_the_aggregation_and_paid(open_runs):
    """A file that scores several times the rest (here the greedy gradient: ≈ 4–8× an honest file) must not push the
    honest miners under the "too small to use" floor: it is a share of the window's median score, not of its best
    (against the best, every honest miner fell out of the peers list and was paid nothing; red-team pass 2026-12-06)."""
    report = open_runs("gradient")
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    zeroed = [(window.window, uid, window.reasons[uid]) for window in report.windows for uid in honest
              if uid in window.reasons]
    assert not zeroed and all(report.windows[-1].weights.get(uid, 0.0) > 0 for uid in honest), zeroed


@pytest.mark.xfail(strict=True, reason="open where spot checks are off, the default (docs/RELIABILITY.md): a greedy "
                                       "file improves the loss more per unit of norm than the protocol's AdamW update; "
                                       "half the work on every page scores half and ranks next to honest work; closed "
                                       "where they are on (the spot_checked test below)")
@pytest.mark.parametrize("kind,strategy", [(kind, strategy) for kind, under in sorted(OPEN.items())
                                           for strategy in under])
def test_an_open_kind_earns_no_more_per_compute_than_honest_work(open_runs, kind, strategy):
    report = open_runs(kind, strategy)
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    cheats = [uid for uid, role in report.roles.items() if role == kind]
    assert weight_per_compute(report, cheats) <= weight_per_compute(report, honest)


@pytest.mark.parametrize("kind,strategy", [("gradient_sign", "sparseloco"), ("thin", "demo")])
def test_where_every_scored_file_is_spot_checked_an_open_kind_earns_less_per_compute(dataset, tmp_path, kind,
                                                                                      strategy):
    """The open kinds above, on a network that replays every scored file from its miner's committed state
    (spot_check_probability 1; spot_check.py) in the production order: each window's drawn miners put their
    states during the next one, and the validator checks them after it closes. The cheat is paid for its first
    window (checked one window later) and banned from then on; every honest miner passes every check."""
    hparams = STRATEGIES[strategy].replace(spot_check_probability=1.0)
    report = run_network(dataset, tmp_path, miners=5, windows=4, adversaries={kind: 1}, hparams=hparams,
                         random_page_count=2)
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    [cheat] = [uid for uid, role in report.roles.items() if role == kind]
    checks = {window: json.loads((tmp_path / "gradients" / f"evaluation-{window}-0.json").read_bytes())["checks"]
              for window in range(1, 4)}
    assert all(checks[window][str(uid)] == "" for window in checks for uid in honest), checks
    # its file of window 0, checked after window 1 closed: banned from window 1 on, its files neither scored nor
    # used from then (still recorded and drawn: each later check fails again); paid for window 0 only (≈ 0.7 of it:
    # the greedy file outscores), then nothing for the ban
    caught = "replaying its window from its committed state gives other values"  # beyond the default tolerance
    assert hparams.spot_check_tolerance == 1e-3
    assert all(checks[window].get(str(cheat), caught).startswith(caught) for window in checks), checks
    assert checks[1][str(cheat)].startswith(caught), checks
    assert all(window.reasons[cheat].startswith("banned until") and cheat not in window.peers
               for window in report.windows[1:])
    assert all(window.weights.get(cheat, 0.0) == 0.0 for window in report.windows[1:])
    assert weight_per_compute(report, [cheat]) < weight_per_compute(report, honest)
    assert progress(report) > 0


def test_where_miners_are_spot_checked_a_state_no_seen_file_committed_to_scores_nothing(dataset, tmp_path):
    """`unlinked`: honest work from a made-up state (its own, nudged), which replays to its file, so only the link
    can tell: its state before must be a fresh start or what its last file committed to after, which was uploaded
    before the window's θ existed (spot_check.py). Checked on every file at scoring, drawn or not."""
    hparams = STRATEGIES["sparseloco"].replace(spot_check_probability=1.0)
    report = run_network(dataset, tmp_path, miners=5, windows=4, adversaries={"unlinked": 1}, hparams=hparams,
                         random_page_count=2)
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    [cheat] = [uid for uid, role in report.roles.items() if role == "unlinked"]
    assert all(window.reasons[cheat].startswith("state: it continues a state no file") and cheat not in window.peers
               for window in report.windows[1:])  # its first window starts fresh: nothing made up yet
    assert not any(uid in window.reasons for window in report.windows for uid in honest)
    assert weight_per_compute(report, [cheat]) < weight_per_compute(report, honest)


def test_a_miner_that_answers_a_spot_check_a_window_late_loses_that_window_and_one_that_never_does_is_banned(
        dataset, tmp_path):
    """A drawn miner puts its state during the window after; one whose node was down then (`answers_late`: every
    answer a window late) leaves the check pending: its file of that window scores 0, and the check is made again a
    window later, which its late answer passes, so it is never banned. `never_answers` is banned at the second
    asking, from then on. Every file is drawn here (p = 1); window 0's checks need no state (a fresh start whose
    replay gives the file bit for bit), so the first one pending is window 1's, after window 2 closes."""
    hparams = STRATEGIES["sparseloco"].replace(spot_check_probability=1.0)
    report = run_network(dataset, tmp_path, miners=5, windows=4, adversaries={"answers_late": 1, "never_answers": 1},
                         hparams=hparams, random_page_count=2)
    [late] = [uid for uid, role in report.roles.items() if role == "answers_late"]
    [silent] = [uid for uid, role in report.roles.items() if role == "never_answers"]
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    checks = {window: json.loads((tmp_path / "gradients" / f"evaluation-{window}-0.json").read_bytes())["checks"]
              for window in range(1, 4)}
    assert not any(uid in window.reasons for window in report.windows for uid in honest), report.windows[-1]
    assert all(checks[window][str(uid)] == "" for window in checks for uid in honest), checks
    assert all(uid not in window.reasons for window in report.windows[:2] for uid in (late, silent))
    pending = "spot check pending: no state put for window"
    assert [report.windows[window].reasons[late][:len(pending) + 2] for window in (2, 3)] == [
        f"{pending} 1", f"{pending} 2"]  # window 1's check passed when made again: not banned
    assert checks[3][str(late)].startswith("pending: no state put for window 2")
    assert report.windows[2].reasons[silent].startswith(f"{pending} 1")
    assert report.windows[3].reasons[silent].startswith("banned until window") and (
        "failed the spot check of window 1: no state put for window 1 during windows 2 and 3"
        in report.windows[3].reasons[silent])
    assert checks[3][str(silent)].startswith("no state put for window 1 during windows 2 and 3")  # a failure
    assert report.windows[3].weights.get(silent, 0.0) == 0.0 < report.windows[3].weights.get(late, 0.0)
    assert weight_per_compute(report, [late]) < weight_per_compute(report, honest)


def test_a_miner_whose_file_the_validator_missed_starts_fresh_and_is_paid_again(dataset, tmp_path):
    """`unseen_once`: honest work, but every read of its bucket by the validator failed in window 1, so its file
    (which landed: its node cannot tell) scored 0 and was not recorded. Carrying its state on, each later file
    would continue a state no recorded file committed to and score 0 for good; its node reads the validator's
    report of window 1 before it mines window 2, starts fresh (which always links) and is paid from then on."""
    hparams = STRATEGIES["sparseloco"].replace(spot_check_probability=1.0)
    report = run_network(dataset, tmp_path, miners=5, windows=4, adversaries={"unseen_once": 1}, hparams=hparams,
                         random_page_count=2)
    [missed] = [uid for uid, role in report.roles.items() if role == "unseen_once"]
    assert report.windows[1].reasons[missed].startswith("its bucket failed every read"), report.windows[1].reasons
    assert all(missed not in report.windows[w].reasons and report.windows[w].scores[missed] > 0 for w in (2, 3)), [
        (w.reasons.get(missed), w.scores.get(missed)) for w in report.windows]
    assert report.windows[3].weights.get(missed, 0.0) > 0


STEERED = STRATEGIES["sparseloco"].replace(spot_check_probability=1.0)


@pytest.fixture(scope="module")
def bit_for_bit_steer(dataset, tmp_path_factory):
    """A steering kind's network with bit-for-bit checks (tolerance 0), where it has no room and sends its honest
    file: `steer` and `steer_carried` alike, so one network (and its home) stands for both."""
    home = tmp_path_factory.mktemp("steer-bit-for-bit")
    return home, run_network(dataset, home, miners=5, windows=4, adversaries={"steer": 1},
                             hparams=STEERED.replace(spot_check_tolerance=0.0), random_page_count=2)


@pytest.mark.parametrize("kind", ["steer", "steer_carried"])
def test_a_file_steered_within_the_spot_check_tolerance_earns_no_more_than_its_honest_work(
        dataset, tmp_path, bit_for_bit_steer, kind):
    """`steer`: its honest file moved toward `gradient_sign`'s as far as the default tolerance lets the values pass
    (the room a tolerance for other kernels' rounding leaves a miner; spot_check.py), its error feedback keeping back
    the excess; `steer_carried`: the same from a carried state without keeping anything back, each parameter within
    the state check's room. `steer_carried` passes every check; `steer`, whose fresh start's 20× room re-encodes
    some positions away from the top-k's near-ties, is banned by the check's rule on positions at its first check.
    Each earns no more than the same uid in the same network with bit-for-bit checks, where it can send only its
    honest file."""
    tolerance = STEERED.spot_check_tolerance
    report = run_network(dataset, tmp_path, miners=5, windows=4, adversaries={kind: 1}, hparams=STEERED,
                         random_page_count=2)
    honest_home, honest = bit_for_bit_steer
    [cheat] = [uid for uid, role in report.roles.items() if role == kind]
    assert honest.roles[cheat] == "steer"
    checks = [json.loads((tmp_path / "gradients" / f"evaluation-{window}-0.json").read_bytes())["checks"]
              for window in range(1, 4)]
    assert len(checks[0]) == 5 and all(check == "" for window in checks for uid, check in window.items()
                                       if int(uid) != cheat), checks
    assert not any(uid in window.reasons for window in report.windows for uid in report.roles if uid != cheat)
    if kind == "steer":
        assert checks[0][str(cheat)].startswith("replaying its window from its committed state: "), checks[0]
        assert "position(s) no tie of its replay's top-k would" in checks[0][str(cheat)]
        assert all(window.reasons[cheat].startswith("banned until window ") for window in report.windows[1:])
    else:
        assert not any(cheat in window.reasons for window in report.windows), report.windows[-1]
        assert all(window[str(cheat)] == "" for window in checks)
    model = build_model("tiny", vocab_size=Dataset.open(dataset).vocab_size)  # the simulation's shapes
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    # the first window it steers, on the same θ in both runs: window 0 (a fresh start, allowed FRESH_START_SLACK ×
    # the tolerance) for `steer`; window 1 for `steer_carried`, whose window 0 is honest work
    window, slack = (0, strategy_of(STEERED).FRESH_START_SLACK) if kind == "steer" else (1, 1.0)
    first = [strategy_of(STEERED.replace(spot_check_tolerance=t)).read_gradient(
        (home / "gradients" / gradient_key(window, cheat)).read_bytes(), window=window, uid=cheat,
        shapes=shapes).tensors for t, home in ((0.0, honest_home), (tolerance, tmp_path))]
    assert 0 < values_difference(first[0], first[1]) <= slack * tolerance  # it steered
    assert weight_per_compute(report, [cheat]) <= 1.05 * weight_per_compute(honest, [cheat])


def test_mixed_forty_percent_adversaries_rank_below_every_honest_miner(dataset, tmp_path):
    adversaries = parse_adversaries("sybil_mean:1,backdate_copy:1,lazy:1,sign_flip:1")
    report = run_network(dataset, tmp_path, miners=10, windows=10, adversaries=adversaries, hparams=FAST,
                         random_page_count=2, seed=1)
    assert sum(role != "honest" for role in report.roles.values()) == 4
    last = report.windows[-1]
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    cheats = [uid for uid, role in report.roles.items() if role != "honest"]
    assert min(last.final[uid] for uid in honest) > max(last.final.get(uid, 0.0) for uid in cheats), last.final


def test_equal_work_gets_pay_of_the_same_order(dataset, tmp_path):
    """8 honest miners: over the last windows the lowest mean weight is at least half the highest (bench/adversaries.py
    runs the 20-window figure)."""
    report = run_network(dataset, tmp_path, miners=8, windows=10, hparams=FAST, seed=5, random_page_count=2)
    mean = {uid: sum(w.weights.get(uid, 0.0) for w in report.windows[-5:]) / 5 for uid in report.roles}
    assert min(mean.values()) >= 0.5 * max(mean.values()), mean


def test_parse_adversaries():
    assert parse_adversaries("copy:2, sign_flip:1,copy") == {"copy": 3, "sign_flip": 1}
    with pytest.raises(ValueError, match="unknown adversary"):
        parse_adversaries("bribe:1")


def test_templar_lib_never_imports_dagster():
    code = ("import sys, templar_lib.roles, templar_lib.simulate, templar_lib.chain, templar_lib.gather; "
            "print('dagster' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_publishing_the_signs_gives_the_same_network(dataset, tmp_path):
    """aggregation_format 2 publishes sign(update) instead of the combined coefficients: every node replays it to
    the same θ as format 1 (the aggregator's own step included), with the same scores."""
    import dataclasses

    coefficients = run_network(dataset, tmp_path / "one", miners=3, windows=2, hparams=FAST, random_page_count=2)
    signs = run_network(dataset, tmp_path / "two", miners=3, windows=2, random_page_count=2,
                        hparams=dataclasses.replace(FAST, aggregation_format=2))
    assert [w.scores for w in signs.windows] == [w.scores for w in coefficients.windows]
    one, two = (latest_checkpoint(LocalBucket(tmp_path / name / "aggregator")) for name in ("one", "two"))
    assert one.window == two.window == 2 and all(torch.equal(one.parameters[n], two.parameters[n])
                                                 for n in one.parameters)
    shapes = {n: tuple(t.shape) for n, t in two.parameters.items()}
    for window in (0, 1):
        published = read_aggregation(LocalBucket(tmp_path / "two" / "aggregator").get(
            f"aggregation-{window}.safetensors"), window=window, shapes=shapes)
        assert published.format == 2 and published.signs and published.peers == signs.windows[window].peers
