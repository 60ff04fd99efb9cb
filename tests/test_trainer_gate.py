"""The gate's pure decision: overall gain, evidence, and a per-domain veto that needs evidence too."""

from trainer.gate import Tally, gate


def test_a_domain_vetoes_a_gain_only_with_as_much_evidence_as_the_gate_needs():
    live = {"c": Tally(200, 1000), "prose": Tally(36, 100)}
    better_on_c = {"c": Tally(600, 1000), "prose": Tally(25, 100)}  # prose worse, on 100 positions
    assert gate(better_on_c, live, margin=0.01, min_positions=100).reason == "worse than live on prose"
    decision = gate(better_on_c, live, margin=0.01, min_positions=300)
    assert decision.publish, decision.reason  # 100 prose positions are too few to veto at 300
    assert not gate(live, live, margin=0.01, min_positions=100).publish  # no gain, no publish
