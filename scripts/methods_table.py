"""Print the README's methods table from kvq_core.formats (so the table is generated, not typed)."""

from kvq_core.formats import METHODS, bits_label, get_format

TOKENS, HEADS, HEAD_DIM = 32768, 32, 128


def main() -> None:
    print("| method | bits (K/V) | avg bits @ 32K | storage | source |")
    print("| --- | --- | --- | --- | --- |")
    for name, spec in METHODS.items():
        for kv in spec.bits:
            fmt = get_format(name, kv)
            avg = fmt.avg_bits(TOKENS, HEADS, HEAD_DIM)
            print(f"| `{name}` | {bits_label(kv)} | {avg:.3f} | {spec.summary} | {spec.citation} |")


if __name__ == "__main__":
    main()
