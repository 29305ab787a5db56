"""Prints the commands of the README's opening block, one a line.

The README opens with a ```bash block of two commands (set up and run the
main job; set up and run the tests), each followed by a `# comment`. CI runs
exactly these lines, so the README and CI cannot drift apart.

Usage: python .ci/readme_commands.py [README.md]
"""

import re
import sys


def readme_commands(text):
    """The command lines of the first fenced ```bash block of `text`,
    without their trailing `# comments`.

    Raises:
        ValueError: if the text has no ```bash block, or the block no
            command.
    """
    match = re.search(r"^```bash\n(.*?)^```", text, re.M | re.S)
    if match is None:
        raise ValueError("The README has no ```bash block.")
    commands = []
    for line in match.group(1).splitlines():
        command = re.sub(r"\s+#\s.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(command)
    if not commands:
        raise ValueError("The README's first ```bash block has no command.")
    return commands


def main(argv):
    path = argv[1] if len(argv) > 1 else "README.md"
    with open(path, encoding="utf-8") as file:
        for command in readme_commands(file.read()):
            print(command)


if __name__ == "__main__":
    main(sys.argv)
