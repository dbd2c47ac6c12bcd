"""cleanbackdoor: backdoor attacks that leave the training images clean, measured and audited.

Attacks (``cleanbackdoor.attacks``) return a :class:`~cleanbackdoor.attacks.Poisoning`; the experiment
(``cleanbackdoor.experiment``) trains and evaluates the victim identically for every attack.
"""

__version__ = "0.1.0"
