"""``lipia doctor``: the frontend team's checklist as a command (see ``run``)."""
