// Command kube is a hyperkube-style multi-call binary for the local control plane.
//
// One link of the shared Kubernetes packages instead of five separate binaries saves
// most of the build time and disk. The component is chosen by argv[1] (or by the
// basename of argv[0] when invoked through a symlink):
//
//	kube kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|etcd [flags...]
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // CronJob time zones, as upstream kube-apiserver does

	"github.com/spf13/cobra"
	etcdmain "go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var cobraCommands = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
}

func usage() {
	names := []string{"etcd", "kubectl"}
	for n := range cobraCommands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: kube COMPONENT [flags...]\ncomponents: %v\n", names)
	os.Exit(2)
}

func main() {
	name := filepath.Base(os.Args[0])
	if name == "kube" || name == "kube.exe" {
		if len(os.Args) < 2 {
			usage()
		}
		name = os.Args[1]
		// Shift so every component sees the argv it would see as its own binary.
		os.Args = os.Args[1:]
	}
	switch name {
	case "etcd":
		etcdmain.Main(os.Args)
	case "kubectl":
		logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) //nolint:errcheck
		command := kubectlcmd.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		newCommand, ok := cobraCommands[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "kube: unknown component %q\n", name)
			usage()
		}
		command := newCommand()
		command.SetArgs(os.Args[1:])
		os.Exit(cli.Run(command))
	}
}
