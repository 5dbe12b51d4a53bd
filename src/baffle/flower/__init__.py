"""BAFFLE on Flower (``pip install baffle[flower]``): a thin adapter over the simulator's
own client and server functions. The core package never imports this one."""
