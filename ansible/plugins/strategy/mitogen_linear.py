"""Ansible's linear strategy run by Mitogen (the `mitogen` release pinned in requirements/dev.txt).

Mitogen keeps one Python interpreter per host for the whole run and sends it each module's code once,
where the stock executor starts Python and imports Ansible's module code again for every task: a
no-change site.yml on three boards and a balancer costs the hosts a tenth of the CPU. ansible.cfg
finds the strategy in this directory, so it names no path inside a virtualenv. ansible-core 2.19
warns that strategy plugins outside ansible.builtin are deprecated; without the two `strategy` lines
of ansible.cfg the plays run on the stock executor unchanged.
"""

from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule

__all__ = ["StrategyModule"]
