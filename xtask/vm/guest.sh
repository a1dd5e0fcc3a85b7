#!/bin/sh
# PID 1 in the VM's root (the host's root read-only, a tmpfs overlay on top, mounted by the
# initramfs's /init). Runs the run directory's cmd.sh, prints its exit status on the serial
# console as `VM-EXIT-STATUS=N` (and writes it to DIR/exit-status), and powers off.
run=$(dirname "$0")

echo "VM-COMMAND-START"
sh "$run/cmd.sh" </dev/null
status=$?
# The guest's /tmp is a tmpfs that ends with the VM: keep the logs the command left there
# (nat-ctl writes its verifier log to /tmp) in the run directory.
for file in /tmp/*.log; do
    [ -f "$file" ] && mkdir -p "$run/guest-tmp" && cp "$file" "$run/guest-tmp/"
done
echo "$status" >"$run/exit-status"
echo "VM-EXIT-STATUS=$status"

# The host's poweroff is systemd's, which needs a running systemd; busybox's calls reboot(2).
/bin/busybox poweroff -f 2>/dev/null
echo o >/proc/sysrq-trigger
# Last resort: PID 1 exiting panics the kernel, which (panic=-1, qemu -no-reboot) ends qemu.
sleep 10
exit "$status"
