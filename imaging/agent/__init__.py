"""The imaging agent that runs inside the imager (a busybox ash script, package data)."""

from pathlib import Path

AGENT_SCRIPT = Path(__file__).with_name("pxepeer-agent.sh")
