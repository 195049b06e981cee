#!/bin/sh
exec python3 -m demo.greet
