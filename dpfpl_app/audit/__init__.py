"""Empirical privacy audits: lower bounds on the epsilon a mechanism really has.

An accountant gives an upper bound on epsilon from a proof; an audit attacks the running
code and gives a lower bound that holds with a stated confidence. A lower bound above
the claim means the code does not do what the proof assumes.

Modules, one job each:

* ``bounds``: statistics only (numpy/scipy): attacker scores or guesses -> epsilon lower
  bound, for many independent trials and for one run with many canaries.
* ``claims``: the epsilon a single noisy release is claimed to have, and its exact value.
* ``mechanism``: the three releases of DP-FPL (local update, global aggregate, secure
  Skellam sum), each produced by the production code, on neighbouring inputs with and
  without a worst-case canary.
* ``measurements``: the released noise std and the canary's shift against the claim.
* ``white_box``: many trials of one release, an adversary that scores each, the verdict.
* ``canaries``: gradient canaries, from the auditor's file to a client's batches.
* ``one_run``: a real federation with canaries, the adversaries' scores, the bound.
* ``report``, ``one_run_report`` and ``cli``: ``dpfpl audit`` (report.json, a plot, a
  table).

Nothing is imported here, so ``dpfpl`` can build its parser without loading torch.
"""
