"""Front ends off the training path: demo, bench, ablate, make-tiny and the step-0 check.

Each is a ``main(argv) -> int`` reached through `ds-upcycle <command>`. The library
(``ds_upcycle.*`` outside this package) never imports from here; tests/test_layout.py enforces it.
"""
