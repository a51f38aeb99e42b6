"""Events for the merchant's systems: the outbox written with each public change, and its
delivery to webhook endpoints (README "Events for your systems")."""
