"""A faithful fake of Safaricom's Daraja (OAuth, STK Push, STK Query, callbacks) as an ASGI app.

It shares no code with lipia's Daraja client or payment rules, on purpose: a fake built from the
client's own models would repeat the client's mistakes instead of catching them.
"""

from __future__ import annotations

from .app import create_simulator
from .config import SimulatorConfig
from .daraja_api import SimulatedConnectionReset
from .engine import Simulator

__all__ = ["SimulatedConnectionReset", "Simulator", "SimulatorConfig", "create_simulator"]
