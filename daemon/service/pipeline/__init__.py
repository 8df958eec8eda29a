"""The request path every verb shares: ``core`` (``Service``: parse, journal, answer once, replay), ``context``
(what a handler gets besides its request, and the verb tables subsystems hand the service), ``errors`` (the
request path's own refusals), ``payload`` (a payload read before validation), ``outbox`` (the state document,
events and streams the MQTT adapter publishes) and ``metrics``."""
