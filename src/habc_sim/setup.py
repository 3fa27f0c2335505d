from setuptools import find_packages, setup

package_name = 'habc_sim'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='habc developers',
    maintainer_email='habc@example.org',
    description='Simulated bimanual robot and scripted operator of habc.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'sim_robot_node = habc_sim.sim_robot_node:main',
            'scripted_operator_node = habc_sim.scripted_operator_node:main',
            'robot_stub_node = habc_sim.robot_stub_node:main',
        ],
    },
)
