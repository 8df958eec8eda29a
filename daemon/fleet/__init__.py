"""The fleet simulator: many hosts (each a full :class:`~daemon.app.Daemon`) in a few worker processes.

``plan`` draws hosts from a :class:`schemas.fleet.FleetSpec`; ``host`` runs one host through its lifecycle
(boot, injected faults, crash and reboot from its state dir); ``worker`` holds many hosts on one event loop;
``runner`` is ``livepatchd fleet``: the broker, the workers, the hosts' assignment, growing and shrinking.
"""
