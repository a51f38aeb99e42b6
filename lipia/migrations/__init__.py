"""lipia's Alembic environment and revisions; ``lipia.schema`` runs them (``lipia db upgrade``)."""
