"""`python -m pirl_tools ...`, also the torchrun entry (`torchrun ... -m pirl_tools pretrain`)."""

from pirl_tools.main import main

main(prog_name="pirl-tools")
