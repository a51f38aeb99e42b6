"""Crash-anywhere chaos run (after "Murphy in action" in Brandur Leach's idempotency-keys article).

Two real processes, as in production: ``lipia simulator`` (the Daraja simulator, on its own port)
and ``lipia serve`` pointed at it with ``LIPIA_DARAJA_BASE_URL`` and a SQLite file. Concurrent
clients check out (create an order, initiate with an ``Idempotency-Key``, poll the status until it
is final) while

* a killer ``SIGKILL``s lipia at random moments and restarts it on the same database file, and
* a fault injector arms dropped and duplicated callbacks through the simulator's control API
  (faults live in the simulator process, so they outlast lipia's restarts).

When the clients are done, faults stop and the reconciler has had time, the run checks the
invariants against the simulator's ledger (the truth about what the customer did) and
lipia's database (opened read-only):

* every payment final: nothing left INITIATING / PENDING / UNKNOWN;
* 0 lost: each paid ledger push has exactly one lipia payment with its CheckoutRequestID, COMPLETED;
* 0 phantom: no COMPLETED payment whose ledger push is not paid;
* 0 double-paid: at most one COMPLETED payment per order, and the order points at it;
* receipts unique, and each COMPLETED payment carries its push's receipt;
* pushes: every ledger push belongs to exactly one lipia payment (matched by the secret token in
  its CallBackURL, which lipia stores hashed), every CheckoutRequestID lipia holds is in the
  ledger, and pushes per order <= distinct keys the clients used for it (no hidden re-sends);
* every client-visible final status agrees with the ledger outcome of that payment's push;
* every recorded transition is an edge of ``lipia.models.TRANSITIONS``.

A kill can land after Daraja accepted a push and before lipia stored its CheckoutRequestID. The
token-addressed callback then settles it; if that callback is also lost (dropped by a fault, sent
while lipia was down, or never sent: the silent-success number), lipia can only expire it, and
finding the money needs ledger reconciliation (not built yet). Those are counted
as ``double_fault``, not as lost. ``--kill-mode quiet`` kills only while no initiate is in flight,
which rules them out (the CI test uses it so its result is deterministic).

Run: ``python -m bench.chaos --checkouts 200 --kills 10`` (see bench/README.md). The modules:
``run`` (the run, and the simulator and lipia as child processes), ``checks`` (the invariants,
one function each), ``report`` (what the run records and reports), ``__main__`` (the command
line).
"""
