"""Hostile-script suite (issue 4): one attack per test, through the real CLI.

This file makes `tests/hostile` a package on purpose. Without it pytest would
import `tests/hostile/conftest.py` under the bare module name `conftest`,
replacing `tests/conftest.py` in `sys.modules`, and every top-level test that
does `from conftest import ...` would then import the wrong module. As a
package, this conftest is `hostile.conftest`, the top-level one stays
`conftest`, and the helpers live in `hostile.attack`.
"""
