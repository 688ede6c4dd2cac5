"""What the checks are built on: protocols, parsers and evaluators that decide
nothing themselves. They return data (or raise their own errors), and a check
turns that into a verdict; none of them counts anything or keeps session state."""
