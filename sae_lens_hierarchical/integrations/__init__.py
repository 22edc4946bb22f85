"""Where this package meets SAELens, SAE-Bench and the rest of the stack.

* `patches`: every change made to other libraries' internals, each with the upstream
  behaviour it works around (a table in its docstring);
* `releases`: release ids for hierarchical SAEs (merged into SAELens's directory) and `publish`;
* `resume`: seeding and checkpoint look-up, what same-seed and resumed runs need beyond SAELens.
"""
