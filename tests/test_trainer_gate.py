"""The gate's pure decision: overall gain, evidence, and a per-domain veto that needs evidence too;
when replaying the buffer stops."""

from trainer.gate import Tally, gate, replay_stop


def test_a_domain_vetoes_a_gain_only_with_as_much_evidence_as_the_gate_needs():
    live = {"c": Tally(200, 1000), "prose": Tally(36, 100)}
    better_on_c = {"c": Tally(600, 1000), "prose": Tally(25, 100)}  # prose worse, on 100 positions
    assert gate(better_on_c, live, margin=0.01, min_positions=100).reason == "worse than live on prose"
    decision = gate(better_on_c, live, margin=0.01, min_positions=300)
    assert decision.publish, decision.reason  # 100 prose positions are too few to veto at 300
    assert not gate(live, live, margin=0.01, min_positions=100).publish  # no gain, no publish


def test_replay_stops_once_its_best_round_is_patience_rounds_old_or_at_the_cap():
    assert replay_stop([0.1], patience=2, max_rounds=5) is None  # nothing replayed yet
    assert replay_stop([0.1, 0.2, 0.3], patience=2, max_rounds=5) is None  # still improving
    assert replay_stop([0.1, 0.3, 0.2], patience=2, max_rounds=5) is None  # one round without a gain
    assert replay_stop([0.1, 0.3, 0.2, 0.3], 2, 5) == "no gain in 2 rounds, best 0.3000 after round 1"
    assert replay_stop([0.1, 0.1, 0.1], 2, 5).startswith("no gain in 2 rounds")  # a tie is no gain
    assert replay_stop([0.1, 0.2, 0.3], 2, max_rounds=2) == "2 rounds, best 0.3000 after round 2"
    assert replay_stop([0.1], 2, max_rounds=0) == "0 rounds, best 0.1000 after round 0"
